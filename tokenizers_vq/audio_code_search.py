"""Analysis-by-synthesis encoding for the audio codec: search each clip's codes for a closer waveform.

The encoder picks, frame by frame and level by level, the code vector nearest to its latent. That
minimises an error in latent space, not in the waveform the decoder makes of the codes. Classical
speech codecs (CELP) choose their codes by synthesis instead: decode each candidate, keep the one
whose output is closest to the input. This does the same for a trained codec, by coordinate
descent: in frame order, and within a frame level by level, each code is replaced by whichever of
its `candidates` nearest code vectors (to the latent, less the other levels' codes of that frame)
gives the decoded clip the least squared error over its real samples, the other codes held fixed.
The current code is always a candidate, so no clip's error ever rises, and the decoder, the token
format and the bit rate are unchanged: only the encoder searches.

A code changes only the decoded samples within the decoder's reach of its frame, so each candidate is
decoded in a window around it (`4 x reach + 1` frames, exactly as the whole clip would decode there;
only the frames it scores are decoded to full rate, where most of the decoder's work lies),
and codes further apart than twice the reach are searched together: a sweep costs about
`frames x levels x candidates` window decodes however long the clip, in `2 x reach + 1` batched
steps per level. A second sweep gains less than the first (BENCHMARKS.md). A shorter `reach` than the
decoder's trades exactness for speed: most of a code's effect lies near its frame (BENCHMARKS.md). Any quantiser whose codes
can all be looked up is searched: VQ, residual VQ (level by level) and LFQ (whose nearest codes are
those a few sign flips away), up to `MAX_CODEBOOK` codes a level. `code_choice_logits` writes the
encoder's own pick as logits, so that searched codes can teach the encoder to pick them itself, and
`expected_codes` relaxes that pick for a gradient through it
(`benchmarks/audio_encoder_tuning.py`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from einops import rearrange, repeat
from torch import Tensor
from tqdm.auto import tqdm


class SearchedCodes(NamedTuple):
    codes: Tensor  # (n frames q) int64, the searched codes (as the encoder's, for padding frames)
    start_error: Tensor  # (n,) squared waveform error of the encoder's codes, over real samples
    error: Tensor  # (n,) the same for the searched codes; never above start_error
    changed: Tensor  # (n,) code positions that differ from the encoder's
    reach: int  # frames each side the candidates were scored over (the decoder's whole reach: exact)


MAX_CODEBOOK = 1 << 16  # codes per level whose vectors the search tabulates
# Candidate windows decoded at once. On the CPU bigger batches are slower, not faster: their activations
# outgrow what the allocator keeps for reuse, and fresh pages cost more than the decode (BENCHMARKS.md).
CPU_DECODE_BATCH, DEVICE_DECODE_BATCH = 16, 256
RATE_BATCH = 256  # changed codes whose bits `rate` weighs at once


def decode_batch_size(device: torch.device | str) -> int:
    """Candidate windows `search_codes` decodes at once on `device` unless told otherwise."""
    return CPU_DECODE_BATCH if torch.device(device).type == "cpu" else DEVICE_DECODE_BATCH


def _code_tables(quantizer) -> list[Tensor]:
    """Each level's code vectors `(K d)` in latent space, as `lookup` adds them up."""
    levels = getattr(quantizer, "levels", [quantizer])  # a single quantiser is one level
    if quantizer.codebook_size > MAX_CODEBOOK:
        raise ValueError(f"code search tabulates every code; {quantizer.codebook_size} a level is more than "
                         f"{MAX_CODEBOOK}")
    indices = torch.arange(quantizer.codebook_size)
    return [level.lookup(rearrange(indices, "k -> 1 k"))[0] for level in levels]


def code_choice_logits(quantizer, latents: Tensor, codes: Tensor) -> list[Tensor]:
    """`(b frames d)` latents and `(b frames q)` codes -> each level's `(b frames K)` logits of the choice the
    encoder makes there: minus the squared distance, up to a constant per frame, from the latent less the
    codes' earlier levels to each code vector. Their argmax is the code `to_indices` picks, so a
    cross-entropy towards searched `codes` teaches an encoder to pick those itself (differentiable in
    `latents`). VQ and residual VQ whose codes live in latent space only: a factorised or cosine codebook,
    or LFQ, chooses otherwise."""
    levels = getattr(quantizer, "levels", [quantizer])
    for level in levels:
        config = getattr(level, "config", None)
        if getattr(config, "kind", None) != "vq" or config.codebook_dim or config.use_cosine:
            raise ValueError("code_choice_logits: only VQ codes chosen by latent distance (no codebook_dim, no "
                             f"use_cosine) have them; this quantiser has {type(level).__name__} levels")
    residual, logits = latents.float(), []
    for level, table in enumerate(_code_tables(quantizer)):
        table = table.detach().to(residual)
        logits.append(2 * residual @ table.T - table.square().sum(dim=-1))
        residual = residual - table[codes[..., level]]
    return logits


def expected_codes(quantizer, latents: Tensor, codes: Tensor, temperature: float) -> Tensor:
    """`(b frames d)`: the sum over levels of each level's code vectors weighted by softmax(`code_choice_logits`
    / temperature), the choice relaxed. Added as `hard + soft - soft.detach()`, it passes the gradient to
    the latents through the choice among codes (straight-through softmax) rather than past it (the
    straight-through copy, which ignores where the other codes lie)."""
    tables = [table.detach().to(latents.device, torch.float32) for table in _code_tables(quantizer)]
    logits = code_choice_logits(quantizer, latents, codes)
    return sum(torch.softmax(level / temperature, dim=-1) @ table for level, table in zip(logits, tables))


def as_grid(codes: Tensor) -> Tensor:
    """A codec's codes, `(n frames)` for one codebook or `(n frames q)` -> `(n frames q)`, as the search holds
    them (`from_grid` undoes it)."""
    return codes if codes.ndim == 3 else rearrange(codes, "n frames -> n frames 1")


def from_grid(codes: Tensor, num_codebooks: int) -> Tensor:
    """`(n frames q)` codes, as the search holds them -> the shape a codec's `decode` takes (`(n frames)` for
    one codebook)."""
    return codes[..., 0] if num_codebooks == 1 else codes


@torch.no_grad()
def search_codes(tokenizer, clips: Tensor, lengths: Tensor, candidates: int = 8, sweeps: int = 1,
                 batch_size: int | None = None, progress: bool = False, initial: Tensor | None = None,
                 rate: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None, rate_weight: float = 0.0,
                 rate_span: int | None = None, reach: int | None = None) -> SearchedCodes:
    """`(n c t)` clips with `(n,)` real lengths -> their codes after `sweeps` sweeps of the search, from
    the encoder's codes or from `initial` ones (a previous search's, to sweep on). `start_error` and
    `changed` are against the encoder's codes either way.

    With `rate` (`(m frames q)` codes of the clips `rows` `(m,)`, each differing from the current codes
    at most at its frame of `at` `(m,)` -> `(m,)` bits that such a change can move, e.g. a prior's NLL)
    and `rate_weight` > 0, a candidate is judged by error + rate_weight x bits instead (rate-distortion
    optimised): then that sum never rises, and the error alone may. `rate_span` is how many frames
    apart two changes must lie for their bits to add up (the prior's sequence, e.g.; default: the
    whole clip, so each clip is searched one code at a time). `batch_size`: windows decoded at once
    (default: `decode_batch_size`).

    `reach`: frames each side of a code that its candidates are scored over (default: the decoder's whole
    reach, `decoder_reach_frames`, which is exact). A shorter one decodes shorter windows, `4 x reach + 1`
    frames, and searches codes `2 x reach + 1` apart together: faster, and approximate, since a code's
    effect beyond it is ignored. Then each clip's whole cost is checked after every sweep, and a clip whose
    cost rose keeps the codes it had before that sweep, so the cost still never rises.
    """
    if candidates < 1 or sweeps < 0:
        raise ValueError(f"need candidates >= 1 and sweeps >= 0, got {candidates} and {sweeps}")
    exact_reach = tokenizer.decoder_reach_frames
    if reach is not None and reach < 0:
        raise ValueError(f"reach is frames each side of a code, >= 0; got {reach}")
    reach = exact_reach if reach is None else min(reach, exact_reach)
    device = next(tokenizer.parameters()).device
    batch_size = batch_size or decode_batch_size(device)
    clips, lengths = clips.to(device).float(), torch.as_tensor(lengths, device=device)
    tables = [table.to(device) for table in _code_tables(tokenizer.quantizer)]
    latents = tokenizer._latents(clips)
    start_codes = as_grid(tokenizer.quantizer.to_indices(latents))
    codes = start_codes.clone() if initial is None else as_grid(initial).to(device).clone()
    waveforms = _Waveforms(tokenizer, clips, lengths, codes.shape[1], batch_size)
    start_error = waveforms.errors(start_codes)
    weighing = rate is not None and rate_weight > 0
    stride = max(2 * reach + 1, (rate_span or codes.shape[1]) if weighing else 0)
    frames = -(-lengths // tokenizer.hop_length)
    k = min(candidates, tables[0].shape[0])
    per_sweep = [(offset, level) for offset in range(min(stride, int(frames.max()) if len(frames) else 0))
                 for level in range(len(tables))]
    steps = per_sweep * sweeps

    def bits_of(codes: Tensor, rows: Tensor, at: Tensor) -> Tensor:  # `rate`, RATE_BATCH rows at a time
        return torch.cat([rate(codes[i : i + RATE_BATCH], rows[i : i + RATE_BATCH], at[i : i + RATE_BATCH])
                          for i in range(0, len(codes), RATE_BATCH)])

    def clip_costs(codes: Tensor) -> Tensor:  # (n,) what the search lowers: the error, plus the weighed bits
        cost = waveforms.errors(codes)
        if weighing:  # the bits of every span (one `at` in each)
            rows = torch.arange(len(codes), device=device)
            for start in range(0, codes.shape[1], rate_span or codes.shape[1]):
                cost = cost + rate_weight * bits_of(codes, rows, torch.full_like(rows, start)).to(cost)
        return cost

    guarded = reach < exact_reach and steps
    before, before_cost = (codes.clone(), clip_costs(codes)) if guarded else (None, None)
    for step, (offset, level) in enumerate(tqdm(steps, desc="code search", disable=not progress)):
        rows, at = _positions(frames, offset, stride)
        current = codes[rows, at, level]
        frame_codes = sum(table[codes[rows, at, j]] for j, table in enumerate(tables))
        target = latents[rows, at] - (frame_codes - tables[level][current])
        ranked = torch.cdist(target[:, None], tables[level])[:, 0].topk(k, largest=False).indices  # (p k)
        missing = ~(ranked == rearrange(current, "p -> p 1")).any(dim=1)
        ranked[missing, -1] = current[missing]  # the current code always competes: the error never rises
        cost = waveforms.window_errors(codes, rows, at, level, ranked, reach)
        if weighing:
            trial = repeat(codes[rows], "p frames q -> (p k) frames q", k=k).clone()
            trial_rows, trial_at = repeat(rows, "p -> (p k)", k=k), repeat(at, "p -> (p k)", k=k)
            trial[torch.arange(len(trial), device=device), trial_at, level] = rearrange(ranked, "p k -> (p k)")
            bits = bits_of(trial, trial_rows, trial_at)
            cost = cost + rate_weight * rearrange(bits.to(cost), "(p k) -> p k", k=k)
        codes[rows, at, level] = ranked.gather(1, cost.argmin(dim=1, keepdim=True)).squeeze(1)
        if guarded and (step + 1) % len(per_sweep) == 0:  # a sweep done: clips it made worse keep their codes
            after_cost = clip_costs(codes)
            worse = after_cost > before_cost
            codes[worse] = before[worse]
            before, before_cost = codes.clone(), torch.where(worse, before_cost, after_cost)
    error = waveforms.errors(codes) if steps or initial is not None else start_error
    changed = (codes != start_codes).flatten(1).sum(dim=1)
    return SearchedCodes(codes.cpu(), start_error.cpu(), error.cpu(), changed.cpu(), reach)


def _positions(frames: Tensor, offset: int, stride: int) -> tuple[Tensor, Tensor]:
    """The code positions searched together: in every clip, each real frame `offset`, `offset + stride`, ...
    -> `(p,)` clip rows and `(p,)` frames."""
    starts = torch.arange(offset, int(frames.max()), stride, device=frames.device)
    rows, which = (rearrange(frames, "n -> n 1") > starts).nonzero(as_tuple=True)
    return rows, starts[which]


class _Waveforms:
    """The clips, zero-padded to whole frames, and their real-sample weights: the squared error of decoded
    codes, whole or in windows around the code that changes."""

    def __init__(self, tokenizer, clips: Tensor, lengths: Tensor, grid_frames: int, batch_size: int):
        self.tokenizer, self.hop, self.batch_size = tokenizer, tokenizer.hop_length, batch_size
        samples = grid_frames * self.hop
        self.clips = torch.nn.functional.pad(clips, (0, samples - clips.shape[-1]))
        self.weights = (torch.arange(samples, device=clips.device) < rearrange(lengths, "n -> n 1")).float()

    def _decode(self, codes: Tensor, keep: tuple[int, int] | None = None) -> Tensor:
        return self.tokenizer.decode(from_grid(codes, self.tokenizer.num_codebooks), keep=keep).float()

    def errors(self, codes: Tensor) -> Tensor:
        """`(n frames q)` codes of every clip -> `(n,)` squared errors over real samples, decoded whole."""
        out = []
        for start in range(0, len(codes), self.batch_size):
            part = slice(start, start + self.batch_size)
            squared = (self._decode(codes[part]) - self.clips[part]).square()
            out.append((squared * rearrange(self.weights[part], "n t -> n 1 t")).sum(dim=(1, 2)))
        return torch.cat(out)

    def window_errors(self, codes: Tensor, rows: Tensor, at: Tensor, level: int, ranked: Tensor, reach: int) -> Tensor:
        """`(p k)` errors of the clips `rows` with their code `(at, level)` set to each of `ranked`.

        A code changes the decoded samples of its frame and `reach` frames each side, so only those are
        scored (the rest is the same for every candidate), and they come out exactly as in a decode of
        the whole clip when the codes `2 x reach` frames each side are decoded with them. So a long
        clip costs each candidate the same short decode, and changes more than `2 x reach` frames apart
        change disjoint samples: their gains add up, and they can be searched together. Only the scored
        frames are decoded from each window (`decode(keep=...)`): at a reach of 16 about half a window's
        decode, and nothing saved where the window is the whole short clip and scores most of it.
        """
        grid, hop, k = codes.shape[1], self.hop, ranked.shape[1]
        low, high = (at - 2 * reach).clamp(min=0), (at + 2 * reach + 1).clamp(max=grid)
        first, last = (at - reach).clamp(min=0) - low, (at + reach + 1).clamp(max=grid) - low  # scored, in the window
        cost = torch.empty(ranked.shape, device=codes.device)
        for width in (high - low).unique().tolist():  # windows clipped by a clip's edge come in other widths
            group = (high - low == width).nonzero().squeeze(1)
            g_rows, g_at, g_low, g_first, g_last = rows[group], at[group], low[group], first[group], last[group]
            start, stop = int(g_first.min()), int(g_last.max())  # the frames any of them scores
            trial = repeat(codes[rearrange(g_rows, "g -> g 1"), rearrange(g_low, "g -> g 1") + torch.arange(width, device=codes.device)],
                           "g w q -> g k w q", k=k).clone()
            trial[torch.arange(len(group), device=codes.device)[:, None], torch.arange(k, device=codes.device),
                  rearrange(g_at - g_low, "g -> g 1"), level] = ranked[group]
            trial = rearrange(trial, "g k w q -> (g k) w q")
            offsets = start * hop + torch.arange((stop - start) * hop, device=codes.device)  # samples in the window
            scored = (offsets >= rearrange(g_first * hop, "g -> g 1")) & (offsets < rearrange(g_last * hop, "g -> g 1"))
            samples = rearrange(g_low * hop, "g -> g 1") + offsets
            target = rearrange(self.clips[rearrange(g_rows, "g -> g 1"), :, samples], "g t c -> g c t")
            weight = rearrange(self.weights[rearrange(g_rows, "g -> g 1"), samples] * scored, "g t -> g 1 t")
            out = []
            for begin in range(0, len(trial), self.batch_size):
                part = slice(begin, begin + self.batch_size)
                which = torch.arange(len(trial), device=codes.device)[part] // k
                decoded = self._decode(trial[part], keep=(start, stop))  # only the frames scored
                out.append(((decoded - target[which]).square() * weight[which]).sum(dim=(1, 2)))
            cost[group] = rearrange(torch.cat(out), "(g k) -> g k", k=k)
        return cost
