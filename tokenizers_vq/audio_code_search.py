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

The search decodes `candidates` whole clips per code position, so it costs about
`frames x levels x candidates` decodes per clip per sweep; a second sweep gains less than the first
(BENCHMARKS.md). Any quantiser whose codes can all be looked up is searched: VQ, residual VQ (level by
level) and LFQ (whose nearest codes are those a few sign flips away), up to `MAX_CODEBOOK` codes a level.
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


MAX_CODEBOOK = 1 << 16  # codes per level whose vectors the search tabulates


def _code_tables(quantizer) -> list[Tensor]:
    """Each level's code vectors `(K d)` in latent space, as `lookup` adds them up."""
    levels = getattr(quantizer, "levels", [quantizer])  # a single quantiser is one level
    if quantizer.codebook_size > MAX_CODEBOOK:
        raise ValueError(f"code search tabulates every code; {quantizer.codebook_size} a level is more than "
                         f"{MAX_CODEBOOK}")
    indices = torch.arange(quantizer.codebook_size)
    return [level.lookup(rearrange(indices, "k -> 1 k"))[0] for level in levels]


def _as_grid(codes: Tensor) -> Tensor:
    return codes if codes.ndim == 3 else rearrange(codes, "n frames -> n frames 1")


@torch.no_grad()
def search_codes(tokenizer, clips: Tensor, lengths: Tensor, candidates: int = 8, sweeps: int = 1,
                 batch_size: int = 256, progress: bool = False, initial: Tensor | None = None,
                 rate: Callable[[Tensor, Tensor], Tensor] | None = None, rate_weight: float = 0.0) -> SearchedCodes:
    """`(n c t)` clips with `(n,)` real lengths -> their codes after `sweeps` sweeps of the search, from
    the encoder's codes or from `initial` ones (a previous search's, to sweep on). `start_error` and
    `changed` are against the encoder's codes either way.

    With `rate` (`(m frames q)` codes of the clips `rows` `(m,)` -> `(m,)` bits, e.g. a prior's NLL) and
    `rate_weight` > 0, a candidate is judged by error + rate_weight x bits instead (rate-distortion
    optimised): then that sum never rises, and the error alone may.
    """
    if candidates < 1 or sweeps < 0:
        raise ValueError(f"need candidates >= 1 and sweeps >= 0, got {candidates} and {sweeps}")
    device = next(tokenizer.parameters()).device
    clips, lengths = clips.to(device).float(), torch.as_tensor(lengths, device=device)
    tables = [table.to(device) for table in _code_tables(tokenizer.quantizer)]
    single = tokenizer.num_codebooks == 1  # `decode` then takes (n frames)
    samples = clips.shape[-1]
    weights = rearrange(torch.arange(samples, device=device) < rearrange(lengths, "n -> n 1"), "n t -> n 1 t").float()

    def errors(codes: Tensor, rows: Tensor) -> Tensor:
        """Squared error over real samples of each `(m frames q)` code grid for the clips `rows` `(m,)`."""
        out = []
        for start in range(0, len(codes), batch_size):
            part, which = codes[start : start + batch_size], rows[start : start + batch_size]
            decoded = tokenizer.decode(part[..., 0] if single else part, length=samples).float()
            out.append(((decoded - clips[which]).square() * weights[which]).sum(dim=(1, 2)))
        return torch.cat(out)

    latents = tokenizer._latents(clips)
    start_codes = _as_grid(tokenizer.quantizer.to_indices(latents))
    codes = start_codes.clone() if initial is None else _as_grid(initial).to(device).clone()
    frames = -(-lengths // tokenizer.hop_length)
    everyone = torch.arange(len(clips), device=device)
    start_error = errors(start_codes, everyone)
    k = min(candidates, tables[0].shape[0])
    steps = [(f, level) for _ in range(sweeps) for f in range(int(frames.max()) if len(frames) else 0) for level in range(len(tables))]
    for f, level in tqdm(steps, desc="code search", disable=not progress):
        rows = (frames > f).nonzero().squeeze(1)  # clips that have a real frame f
        current = codes[rows, f, level]
        frame_codes = sum(table[codes[rows, f, j]] for j, table in enumerate(tables))
        target = latents[rows, f] - (frame_codes - tables[level][current])
        ranked = torch.cdist(target, tables[level]).topk(k, largest=False).indices  # (r k)
        missing = ~(ranked == rearrange(current, "r -> r 1")).any(dim=1)
        ranked[missing, -1] = current[missing]  # the current code always competes: the error never rises
        trial = repeat(codes[rows], "r frames q -> (r k) frames q", k=k).clone()
        trial[:, f, level] = rearrange(ranked, "r k -> (r k)")
        trial_rows = repeat(rows, "r -> (r k)", k=k)
        cost = errors(trial, trial_rows)
        if rate is not None and rate_weight > 0:
            cost = cost + rate_weight * torch.cat([rate(trial[i : i + batch_size], trial_rows[i : i + batch_size])
                                                   for i in range(0, len(trial), batch_size)]).to(cost)
        best = rearrange(cost, "(r k) -> r k", k=k).argmin(dim=1, keepdim=True)
        codes[rows, f, level] = ranked.gather(1, best).squeeze(1)
    error = errors(codes, everyone) if steps or initial is not None else start_error
    changed = (codes != start_codes).flatten(1).sum(dim=1)
    return SearchedCodes(codes.cpu(), start_error.cpu(), error.cpu(), changed.cpu())
