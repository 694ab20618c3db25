"""The identity (pixels) tokenizer: exact round trips on the level grid, the binarized-MNIST and 8-bit
conventions, the channels-last token layout the manifest expects, and strict save/load."""

import json

import numpy as np
import pytest
import torch
from einops import rearrange
from safetensors.torch import save_file

from pipelines.data import to_tensor_images
from tokenizers_vq.pixels import PixelsConfig, PixelTokenizer


def level_images(levels: int, channels: int, size=(5, 4), count=3, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens (b c h w) and the images on the level grid that they encode."""
    tokens = torch.randint(levels, (count, channels, *size), generator=torch.Generator().manual_seed(seed))
    return tokens, tokens.float() / ((levels - 1) / 2.0) - 1.0


@pytest.mark.parametrize("levels", [2, 5, 256])
@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_is_exact_on_the_level_grid(levels, channels):
    tokenizer = PixelTokenizer(PixelsConfig(in_channels=channels, levels=levels, image_size=(5, 4)))
    tokens, images = level_images(levels, channels)
    encoded = tokenizer.encode(images)
    expected = rearrange(tokens, "b 1 h w -> b h w") if channels == 1 else rearrange(tokens, "b c h w -> b h w c")
    assert encoded.dtype == torch.long and torch.equal(encoded, expected)
    decoded = tokenizer.decode(encoded)
    assert decoded.shape == images.shape and torch.equal(decoded, images)
    assert torch.equal(tokenizer(images), images)


def test_binarisation_is_the_binarized_mnist_convention():
    tokenizer = PixelTokenizer(PixelsConfig(image_size=(1, 6)))
    pixels = torch.tensor([-1.0, -0.3, 0.0, 1e-3, 0.6, 1.0]).reshape(1, 1, 1, 6)
    assert tokenizer.encode(pixels).flatten().tolist() == [0, 0, 0, 1, 1, 1]  # 1 = ink = pixel > 0
    # fixed binarized MNIST rows of {0, 1} become uint8 {0, 255} in pipelines.data, then [-1, 1]
    bits = np.random.default_rng(0).integers(0, 2, size=(4, 28, 28))
    images = to_tensor_images((bits * 255).astype(np.uint8)[..., None])
    assert torch.equal(PixelTokenizer(PixelsConfig()).encode(images), torch.from_numpy(bits))


def test_eight_bit_tokens_are_the_byte_values():
    tokenizer = PixelTokenizer(PixelsConfig(in_channels=3, levels=256, image_size=(2, 3)))
    raw = np.random.default_rng(1).integers(0, 256, size=(5, 2, 3, 3)).astype(np.uint8)  # (n h w c)
    tokens = tokenizer.encode(to_tensor_images(raw))
    assert torch.equal(tokens, torch.from_numpy(raw).long())  # (b h w c): the uint8 layout itself
    assert torch.equal(tokenizer.decode(tokens), to_tensor_images(raw))
    # out-of-range inputs clamp to the end levels
    assert tokenizer.encode(torch.full((1, 3, 2, 3), 3.0)).unique().tolist() == [255]


def test_manifest_attributes_and_flattened_order():
    tokenizer = PixelTokenizer(PixelsConfig(in_channels=3, levels=4, image_size=(5, 4)))
    assert tokenizer.vocab_size == 4 and tokenizer.num_codebooks == 3
    assert tokenizer.token_grid((3, 5, 4)) == (5, 4)
    assert PixelTokenizer(PixelsConfig()).num_codebooks == 1
    tokens, images = level_images(4, 3)
    flat = tokenizer.encode(images).reshape(len(images), -1)  # what an export stores
    i, j, k = 2, 3, 1
    assert torch.equal(flat[:, (i * 4 + j) * 3 + k], tokens[:, k, i, j])  # channel fastest, then column, row
    with pytest.raises(ValueError, match="channel"):
        tokenizer.token_grid((1, 5, 4))
    with pytest.raises(ValueError, match="image_size"):
        tokenizer.encode(torch.zeros(1, 3, 6, 4))
    with pytest.raises(ValueError, match="token grid"):
        tokenizer.decode(torch.zeros(1, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="lie in"):
        tokenizer.decode(torch.full((1, 5, 4, 3), 4))


def test_nothing_to_train_and_device():
    tokenizer = PixelTokenizer(PixelsConfig())
    assert tokenizer.needs_training is False
    assert tokenizer.param_groups() == {} and tokenizer.phases(0) == [] and list(tokenizer.parameters()) == []
    assert tokenizer.to("cpu").device == torch.device("cpu")
    with pytest.raises(RuntimeError, match="nothing to train"):
        tokenizer.loss({}, "main", 0)


def test_save_load_round_trip_is_strict(tmp_path):
    tokenizer = PixelTokenizer(PixelsConfig(in_channels=3, levels=256, image_size=(8, 8)))
    tokenizer.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())
    assert record == {"kind": "pixels", "config": {"in_channels": 3, "levels": 256, "image_size": [8, 8]}}
    loaded = PixelTokenizer.from_pretrained(tmp_path)
    assert loaded.config == tokenizer.config and not loaded.training
    with pytest.raises(ValueError, match="unknown"):
        PixelsConfig.from_dict({"in_channels": 1, "levels": 2, "image_size": [28, 28], "dither": True})
    save_file({"anchor": torch.zeros(0), "weight": torch.ones(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        PixelTokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "vqvae", "config": record["config"]}))
    with pytest.raises(ValueError, match="kind"):
        PixelTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="levels"):
        PixelsConfig(levels=1)
