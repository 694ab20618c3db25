"""Analysis-by-synthesis code search for the audio codec: it only ever lowers a clip's waveform error,
keeps the encoder's codes where it has no choice, and leaves padding frames alone."""

import pytest
import torch

from helpers.tiny_audio import audio, tiny_config
from tokenizers_vq.audio import AudioVQVAE
from tokenizers_vq.audio_code_search import code_choice_logits, expected_codes, search_codes
from tokenizers_vq.quantizers import LFQConfig, ResidualVQConfig, VQConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_codec(**overrides) -> AudioVQVAE:
    torch.manual_seed(0)
    return AudioVQVAE(tiny_config(**overrides)).eval()


def tones(batch=3, length=400) -> torch.Tensor:
    return audio(batch, length)


def waveform_errors(codec, codes, clips, lengths) -> torch.Tensor:
    decoded = codec.decode(codes if codec.num_codebooks > 1 else codes[..., 0], length=clips.shape[-1])
    mask = (torch.arange(clips.shape[-1]) < lengths[:, None])[:, None]
    return ((decoded - clips).square() * mask).sum(dim=(1, 2))


def test_search_finds_closer_codes_and_never_a_worse_clip():
    codec, clips = tiny_codec(), tones()
    lengths = torch.tensor([400, 300, 250])
    result = search_codes(codec, clips, lengths, candidates=4, sweeps=2)
    assert torch.all(result.error <= result.start_error * (1 + 1e-5))
    assert torch.all(result.error < 0.99 * result.start_error)  # an untrained codec leaves plenty to find
    assert int(result.changed.sum()) > 0
    # the errors are those of decoding the codes, over each clip's real samples only
    assert torch.allclose(result.error, waveform_errors(codec, result.codes, clips, lengths), rtol=1e-4)
    start = codec.encode(clips)
    assert torch.allclose(result.start_error, waveform_errors(codec, start, clips, lengths), rtol=1e-4)
    # padding frames (past a clip's real samples) keep the encoder's codes
    frames = -(-lengths // codec.hop_length)
    for row, real in enumerate(frames.tolist()):
        assert torch.equal(result.codes[row, real:], start[row, real:])


@pytest.mark.parametrize("quantizer", [None, VQConfig(codebook_size=16, seed=1)])
def test_code_choice_logits_pick_what_the_encoder_picks_and_teach_it_other_codes(quantizer):
    codec = tiny_codec(**({} if quantizer is None else {"quantizer": quantizer}))
    clips = tones()
    latents = codec._latents(clips)
    codes = codec.quantizer.to_indices(latents)
    grid = codes if codes.ndim == 3 else codes[..., None]
    logits = code_choice_logits(codec.quantizer, latents, grid)
    assert len(logits) == grid.shape[-1] and logits[0].shape == (*grid.shape[:2], 16)
    assert torch.equal(torch.stack([level.argmax(dim=-1) for level in logits], dim=-1), grid)
    # a cross-entropy towards other codes moves the encoder's latents until it picks more of them
    targets = (grid + 1) % 16
    latents = latents.detach().requires_grad_()
    optimizer = torch.optim.Adam([latents], lr=0.05)
    for _ in range(100):
        loss = sum(torch.nn.functional.cross_entropy(level.flatten(0, 1), targets[..., i].flatten())
                   for i, level in enumerate(code_choice_logits(codec.quantizer, latents, targets)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    picks = codec.quantizer.to_indices(latents.detach())
    assert (picks.reshape(targets.shape) == targets).float().mean() > 0.9


def test_expected_codes_relax_the_choice_and_pass_its_gradient():
    codec = tiny_codec()  # residual VQ, two levels
    latents = codec._latents(tones()).detach().requires_grad_()
    codes = codec.quantizer.to_indices(latents.detach())
    cold = expected_codes(codec.quantizer, latents, codes, temperature=1e-6)
    assert torch.allclose(cold, codec.quantizer.lookup(codes), atol=1e-4)  # cold: the codes chosen
    warm = expected_codes(codec.quantizer, latents, codes, temperature=1e3)
    assert not torch.allclose(warm, cold, atol=1e-3)  # warm: a blend of the codes around
    warm.square().sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_code_choice_logits_refuse_quantizers_that_choose_otherwise():
    for quantizer in (LFQConfig(bits=4), VQConfig(codebook_size=16, use_cosine=True),
                      ResidualVQConfig(num_quantizers=2, quantizer=VQConfig(codebook_size=16, codebook_dim=2))):
        codec = tiny_codec(quantizer=quantizer)
        latents = codec._latents(tones())
        with pytest.raises(ValueError, match="only VQ codes chosen by latent distance"):
            code_choice_logits(codec.quantizer, latents, torch.zeros(*latents.shape[:2], 2, dtype=torch.long))


def test_one_candidate_or_no_sweep_keeps_the_encoders_codes():
    codec, clips = tiny_codec(), tones()
    lengths = torch.full((3,), 400)
    for kwargs in ({"candidates": 1, "sweeps": 1}, {"candidates": 8, "sweeps": 0}):
        result = search_codes(codec, clips, lengths, **kwargs)
        assert torch.equal(result.codes, codec.encode(clips)) and int(result.changed.sum()) == 0
        assert torch.equal(result.error, result.start_error)


@pytest.mark.parametrize("quantizer", [VQConfig(codebook_size=16, seed=1), LFQConfig(bits=4)])
def test_single_level_quantizers_are_searched_too(quantizer):
    codec, clips = tiny_codec(quantizer=quantizer), tones()
    result = search_codes(codec, clips, torch.full((3,), 400), candidates=4)
    assert result.codes.shape == (3, 50, 1)
    assert torch.all(result.error <= result.start_error * (1 + 1e-5)) and int(result.changed.sum()) > 0


def test_the_decode_batch_size_changes_nothing_but_speed():
    codec, clips = tiny_codec(), tones(batch=5)
    lengths = torch.tensor([400, 300, 250, 400, 120])
    small = search_codes(codec, clips, lengths, candidates=4, batch_size=3)
    large = search_codes(codec, clips, lengths, candidates=4, batch_size=256)
    assert torch.equal(small.codes, large.codes) and int(small.changed.sum()) > 0
    assert torch.allclose(small.error, large.error, rtol=1e-5)


def test_bad_search_settings_are_refused():
    with pytest.raises(ValueError, match="candidates >= 1"):
        search_codes(tiny_codec(), tones(), torch.full((3,), 400), candidates=0)


def test_a_second_sweep_from_the_first_ones_codes_goes_on_from_them():
    codec, clips = tiny_codec(), tones()
    lengths = torch.full((3,), 400)
    once = search_codes(codec, clips, lengths, candidates=4, sweeps=1)
    on = search_codes(codec, clips, lengths, candidates=4, sweeps=1, initial=once.codes)
    twice = search_codes(codec, clips, lengths, candidates=4, sweeps=2)
    assert torch.equal(on.codes, twice.codes)
    assert torch.equal(on.start_error, once.start_error) and torch.all(on.error <= once.error * (1 + 1e-5))


def test_a_rate_term_trades_error_for_bits():
    """Weighing each code's cost pulls the search towards the cheap codes: here code 0 of every level
    is free and any other costs a bit, so a heavy weight keeps more zeros than the search without it."""
    codec, clips = tiny_codec(), tones()
    lengths = torch.full((3,), 400)

    def bits(codes, rows, at):
        return (codes != 0).flatten(1).sum(dim=1).float()

    plain = search_codes(codec, clips, lengths, candidates=16, sweeps=1)
    costly = search_codes(codec, clips, lengths, candidates=16, sweeps=1, rate=bits, rate_weight=1e3)
    assert int((costly.codes == 0).sum()) > int((plain.codes == 0).sum())
    unweighted = search_codes(codec, clips, lengths, candidates=16, sweeps=1, rate=bits, rate_weight=0.0)
    assert torch.equal(unweighted.codes, plain.codes)


@pytest.mark.parametrize("latent_dilations", [(), (1, 3)])
def test_the_decoders_reach_bounds_what_one_code_changes(latent_dilations):
    """`decoder_reach_frames` is worked out from the layers; a code changed at frame f must leave every
    decoded sample outside frames f - reach .. f + reach as it was, and reach that far on some side."""
    codec = tiny_codec(decoder_latent_dilations=latent_dilations)
    reach, hop = codec.decoder_reach_frames, codec.hop_length
    codes = torch.randint(0, 16, (4, 120, 2), generator=torch.Generator().manual_seed(0))
    changed = codes.clone()
    changed[:, 60, 0] = (changed[:, 60, 0] + 1) % 16
    moved = (codec.decode(changed) - codec.decode(codes)).abs().amax(dim=(0, 1)).nonzero().squeeze(1) // hop
    assert int(moved.min()) >= 60 - reach and int(moved.max()) <= 60 + reach
    assert max(60 - int(moved.min()), int(moved.max()) - 60) == reach


def test_window_errors_rank_candidates_as_whole_clip_errors_do():
    """A candidate's error in its window differs from its whole clip's error by the same amount for
    every candidate: the samples it cannot reach."""
    from tokenizers_vq.audio_code_search import _Waveforms

    codec, clips = tiny_codec(), tones(batch=2, length=2000)
    lengths = torch.tensor([2000, 1500])
    codes = codec.encode(clips)
    waveforms = _Waveforms(codec, clips, lengths, codes.shape[1], batch_size=64)
    rows, at = torch.tensor([0, 0, 1, 1]), torch.tensor([3, 120, 100, 180])  # near the start, inside, near the end
    ranked = torch.randint(0, 16, (4, 5), generator=torch.Generator().manual_seed(1))
    windowed = waveforms.window_errors(codes, rows, at, 1, ranked, codec.decoder_reach_frames)
    for p in range(4):
        trial = codes[rows[p]].repeat(5, 1, 1)
        trial[:, at[p], 1] = ranked[p]
        whole = waveform_errors(codec, trial, clips[rows[p]].expand(5, -1, -1), lengths[rows[p]].expand(5))
        assert torch.allclose(whole - whole[0], windowed[p] - windowed[p, 0], atol=1e-4)


def test_long_clips_are_searched_in_windows_alone_or_together():
    codec, clips = tiny_codec(), tones(batch=2, length=2400)  # 300 frames, far beyond the decoder's reach
    lengths = torch.tensor([2400, 1700])
    together = search_codes(codec, clips, lengths, candidates=4)
    assert torch.all(together.error < 0.99 * together.start_error)
    assert torch.allclose(together.error, waveform_errors(codec, together.codes, clips, lengths), rtol=1e-4)
    alone = search_codes(codec, clips[1:], lengths[1:], candidates=4)
    assert torch.equal(alone.codes[0], together.codes[1])


@pytest.mark.parametrize("reach", [None, 0])
def test_a_rate_over_spans_of_frames_never_raises_the_weighted_cost(reach):
    """With bits that add up over spans of frames (a prior coding a long file segment by segment), codes
    a span apart are searched together, and error + weight x bits still never rises: with the exact reach
    by construction, with a reach of 0 by the sweep's check of every span's bits (unchecked, it raised both
    clips' cost here by 1-2%)."""
    codec, clips = tiny_codec(decoder_latent_dilations=(1, 3)), tones(batch=2, length=2400)
    lengths = torch.full((2,), 2400)
    span, weight = 50, 0.05

    def bits(codes, rows, at):  # code 0 is free; any other costs a bit, counted in `at`'s span only
        start = (at // span * span)[:, None] + torch.arange(span)
        return (codes.gather(1, start[..., None].expand(-1, -1, codes.shape[-1])) != 0).flatten(1).sum(dim=1).float()

    def total(codes):
        return (codes != 0).flatten(1).sum(dim=1).float()

    result = search_codes(codec, clips, lengths, candidates=8, rate=bits, rate_weight=weight, rate_span=span,
                          reach=reach)
    start = codec.encode(clips)
    assert torch.all(result.error + weight * total(result.codes) <= (result.start_error + weight * total(start)) * (1 + 1e-5))
    if reach is None:  # the exact search trades error for the free code; a reach of 0 finds nothing to keep here
        assert int((result.codes == 0).sum()) > int((start == 0).sum())


def test_a_shorter_reach_searches_approximately_and_never_keeps_a_worse_clip():
    """Scoring candidates over fewer frames than the decoder reaches is faster and approximate: a short
    reach still finds closer codes, and the sweep's check gives a clip it made worse back its codes (with a
    reach of 0, scoring a code's own frame alone, this tiny codec's search would raise every clip's error
    by 2-8%). A reach at or beyond the decoder's is the exact search."""
    codec, clips = tiny_codec(decoder_latent_dilations=(1, 3)), tones(batch=6, length=1600)
    lengths = torch.tensor([1600, 1500, 1200, 1600, 900, 1300])
    short = search_codes(codec, clips, lengths, candidates=16, sweeps=2, reach=2)
    assert torch.all(short.error < 0.99 * short.start_error)
    assert torch.allclose(short.error, waveform_errors(codec, short.codes, clips, lengths), rtol=1e-4)
    blind = search_codes(codec, clips, lengths, candidates=16, sweeps=1, reach=0)
    assert torch.all(blind.error <= blind.start_error)
    assert torch.allclose(blind.error, waveform_errors(codec, blind.codes, clips, lengths), rtol=1e-4)
    exact = search_codes(codec, clips, lengths, candidates=16, sweeps=1)
    beyond = search_codes(codec, clips, lengths, candidates=16, sweeps=1, reach=codec.decoder_reach_frames + 5)
    assert torch.equal(beyond.codes, exact.codes)
    assert (short.reach, blind.reach, exact.reach, beyond.reach) == (2, 0, *[codec.decoder_reach_frames] * 2)
    with pytest.raises(ValueError, match="reach"):
        search_codes(codec, clips, lengths, reach=-1)


def test_the_reach_benchmark_places_all_of_a_changes_energy_within_the_decoders_reach():
    """`benchmarks/audio_code_reach.py` counts a changed code's effect by distance; nothing is lost, as
    nothing lands beyond `decoder_reach_frames`, and the code's own frame holds some of it."""
    from benchmarks.audio_code_reach import energy_by_distance

    codec, clips = tiny_codec(decoder_latent_dilations=(1, 3)), tones(batch=2, length=1600)
    energy = energy_by_distance(codec, clips, [60, 120], seed=3)
    assert energy.shape == (2 * codec.decoder_reach_frames + 1,)
    codes = codec.encode(clips)
    generator, total = torch.Generator().manual_seed(3), 0.0
    for at in (60, 120):
        changed = codes.clone()
        changed[:, at, 0] = torch.randint(0, codec.quantizer.codebook_size, (2,), generator=generator)
        total += float((codec.decode(changed) - codec.decode(codes)).square().sum())
    assert float(energy.sum()) == pytest.approx(total, rel=1e-4)
    assert float(energy[codec.decoder_reach_frames]) > 0
