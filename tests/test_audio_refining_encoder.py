"""The refining encoder of `benchmarks/audio_refining_encoder.py`: it starts as the codec itself, and its
training reaches the refiner through the code choices."""

import pytest
import torch

from benchmarks.audio_refining_encoder import ResidualRefiner, refined_codes, training_loss
from helpers.tiny_audio import audio, tiny_config
from tokenizers_vq.audio import AudioVQVAE
from tokenizers_vq.audio_code_search import as_grid

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_codec_and_refiner() -> tuple[AudioVQVAE, ResidualRefiner]:
    torch.manual_seed(0)
    codec = AudioVQVAE(tiny_config()).eval()
    return codec, ResidualRefiner(codec.encoder, codec.config.embedding_dim)


def own_codes(codec, clips, lengths) -> torch.Tensor:
    """The encoder's codes of the clips, their padding zeroed as the refiner zeroes it."""
    return as_grid(codec.encode(clips * (torch.arange(clips.shape[-1]) < lengths[:, None])[:, None]))


@pytest.mark.parametrize("passes", [0, 1, 3])
def test_a_new_refiner_keeps_the_encoders_own_codes(passes):
    codec, refiner = tiny_codec_and_refiner()
    clips, lengths = audio(3, 400), torch.tensor([400, 310, 250])
    assert torch.equal(refined_codes(codec, refiner, clips, lengths, passes), own_codes(codec, clips, lengths))


def test_training_moves_the_codes_and_lowers_the_loss_on_a_batch():
    codec, refiner = tiny_codec_and_refiner()
    clips, lengths = audio(4, 400), torch.tensor([400, 400, 360, 300])
    codec.requires_grad_(False)
    optimizer = torch.optim.Adam(refiner.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = training_loss(codec, refiner, clips, lengths, passes=1, commitment_weight=0.25)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert refiner.gate.abs().max() > 0
    assert min(losses[-5:]) < losses[0]
    assert not torch.equal(refined_codes(codec, refiner, clips, lengths, 1), own_codes(codec, clips, lengths))
