"""Token layouts (flattened, MusicGen-delayed) round trip exactly; padding masks keep priors' loss and NLL clean."""

import pytest
import torch

from pipelines import layouts
from priors.baselines.nade import NADE, NADEConfig
from priors.rnn import RNNPrior, RNNPriorConfig
from priors.transformer import TransformerPrior, TransformerPriorConfig


def random_codes(batch, frames, num_codebooks, codebook_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(codebook_size, (batch, frames, num_codebooks), generator=generator)


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("num_codebooks", [1, 2, 3])
def test_layout_then_undo_gives_the_original_codes(layout, num_codebooks):
    codes = random_codes(4, 7, num_codebooks, codebook_size=5)
    sequence = layouts.apply_layout(codes, layout, codebook_size=5)
    assert sequence.shape == (4, layouts.sequence_length(layout, 7, num_codebooks))
    assert torch.equal(layouts.undo_layout(sequence, layout, 7, num_codebooks, 5), codes)


def test_two_dimensional_codes_are_one_codebook():
    codes = random_codes(2, 5, 1, codebook_size=4)[..., 0]
    for layout in layouts.LAYOUTS:
        assert torch.equal(layouts.apply_layout(codes, layout, 4), codes)


def test_delayed_layout_shifts_codebook_k_by_k_steps():
    codes = torch.tensor([[[1, 11], [2, 12], [3, 13]]])  # (b frames q): frame f has codes (f + 1, f + 11)
    pad = 20
    sequence = layouts.apply_layout(codes, "delayed", codebook_size=pad)
    assert sequence.tolist() == [[1, pad, 2, 11, 3, 12, pad, 13]]
    assert layouts.prior_vocab_size("delayed", pad) == pad + 1 and layouts.pad_token("delayed", pad) == pad
    assert layouts.prior_vocab_size("flattened", pad) == pad and layouts.pad_token("flattened", pad) == -1
    assert layouts.apply_layout(codes, "flattened", pad).tolist() == [[1, 11, 2, 12, 3, 13]]


def test_pad_where_a_code_belongs_is_refused_or_filled():
    sequence = layouts.apply_layout(random_codes(1, 3, 2, 4), "delayed", 4)
    sequence[0, 2] = 4  # step 1, codebook 0: frame 1's first code
    with pytest.raises(ValueError, match="outside"):
        layouts.undo_layout(sequence, "delayed", 3, 2, 4)
    assert layouts.count_misplaced(sequence, "delayed", 3, 2, 4) == 1
    assert layouts.undo_layout(sequence, "delayed", 3, 2, 4, fill=0)[0, 1, 0] == 0
    with pytest.raises(ValueError, match="layout"):
        layouts.apply_layout(sequence, "interleaved", 4)


def test_valid_token_mask_covers_real_frames_only():
    mask = layouts.valid_token_mask(torch.tensor([2, 4]), "flattened", frames=4, num_codebooks=2)
    assert mask.tolist() == [[True] * 4 + [False] * 4, [True] * 8]
    delayed = layouts.valid_token_mask(torch.tensor([2]), "delayed", frames=4, num_codebooks=2)
    # steps (codebook 0, codebook 1): frames (0, pad) (1, 0) (2, 1) (3, 2) (pad, 3): frames >= 2 are padding.
    assert delayed.tolist() == [[True, True, True, True, False, True, False, False, False, False]]


def test_frame_windows_cut_segments_and_zero_what_lies_past_the_audio():
    codes = torch.arange(1, 15).reshape(1, 7, 2).expand(3, -1, -1)  # frame f holds codes (2f + 1, 2f + 2)
    windows = layouts.frame_windows(codes, start=torch.tensor([0, 3, 6]), real=torch.tensor([3, 2, 1]), frames=3)
    assert windows.tolist() == [
        [[1, 2], [3, 4], [5, 6]],
        [[7, 8], [9, 10], [0, 0]],  # frames 3 and 4 real, frame 5 past the row's audio
        [[13, 14], [0, 0], [0, 0]],  # frame 6 real, the rest past the codes' end
    ]


def _priors(vocab_size, seq_len):
    yield TransformerPrior(TransformerPriorConfig(vocab_size=vocab_size, seq_len=seq_len, num_classes=3,
                                                  hidden_size=16, num_layers=2, num_heads=2))
    yield RNNPrior(RNNPriorConfig(vocab_size=vocab_size, seq_len=seq_len, num_classes=3, embedding_dim=8,
                                  hidden_size=16, num_layers=1, dropout=0.0))
    yield NADE(NADEConfig(vocab_size=vocab_size, seq_len=seq_len, num_classes=3))


@pytest.mark.parametrize("prior", list(_priors(vocab_size=6, seq_len=10)), ids=lambda p: type(p).__name__)
def test_padded_tokens_change_neither_loss_nor_log_prob(prior):
    torch.manual_seed(0)
    prior.eval()  # no dropout, no label dropout: two calls must see the same network
    codes = random_codes(3, 4, 2, codebook_size=5, seed=1)
    tokens = layouts.apply_layout(codes, "delayed", 5)
    mask = layouts.valid_token_mask(torch.tensor([2, 3, 4]), "delayed", 4, 2)
    assert not bool(mask[0, 4]) and bool(mask[0, 5])  # a gap: padding before scored tokens
    changed = torch.where(mask, tokens, (tokens + 3) % 6)
    assert not torch.equal(changed, tokens)
    label = torch.tensor([0, 1, 2])
    batch = {"input_ids": tokens, "label": label, "loss_mask": mask}
    with torch.no_grad():
        torch.testing.assert_close(prior.log_prob(tokens, label, mask=mask), prior.log_prob(changed, label, mask=mask))
        torch.testing.assert_close(prior.loss(batch, "main", 0)[0], prior.loss({**batch, "input_ids": changed}, "main", 0)[0])
        # Without a mask the padding counts, so the change shows.
        assert not torch.allclose(prior.log_prob(tokens, label), prior.log_prob(changed, label))
        # A full mask is no mask; the masked loss is the mean NLL of the scored tokens.
        full = torch.ones_like(mask)
        torch.testing.assert_close(prior.log_prob(tokens, label, mask=full), prior.log_prob(tokens, label))
        expected = -prior.log_prob(tokens, label, mask=mask).sum() / mask.sum()
        torch.testing.assert_close(prior.loss(batch, "main", 0)[0], expected)
