"""Contract tests of the VQ-VAE tokenizer: grids, decode range, gradients, strict save/load, configs."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenizers_vq import TOKENIZERS, VQVAE, VQVAEConfig, load_tokenizer
from tokenizers_vq.quantizers import VQConfig


def tiny_config(**overrides) -> VQVAEConfig:
    config = VQVAEConfig(hidden_channels=8, channel_multipliers=(1, 2), embedding_dim=4,
                         quantizer=VQConfig(codebook_size=16, seed=1))
    return dataclasses.replace(config, **overrides)


def images(batch=2, channels=1, size=28, seed=0) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_registry_entry_builds_from_its_default_config():
    config_cls, model_cls = TOKENIZERS["vqvae"]
    model = model_cls(config_cls())
    assert model.vocab_size == 256 and config_cls.kind == "vqvae"


def test_default_config_tokenizes_mnist_to_a_7x7_grid():
    model = VQVAE(VQVAEConfig()).eval()
    tokens = model.encode(images(batch=3))
    assert tokens.shape == (3, 7, 7) and tokens.dtype == torch.int64
    assert int(tokens.min()) >= 0 and int(tokens.max()) < model.vocab_size
    assert model.token_grid((1, 28, 28)) == (7, 7)


@pytest.mark.parametrize("multipliers, grid", [((1, 2), (8, 8)), ((1, 2, 2), (4, 4))])
def test_32x32_rgb_with_two_or_three_downsamplings(multipliers, grid):
    model = VQVAE(tiny_config(in_channels=3, channel_multipliers=multipliers))
    x = images(channels=3, size=32)
    output = model(x)
    assert model.token_grid((3, 32, 32)) == grid
    assert output.indices.shape == (2, *grid)
    assert output.reconstruction.shape == x.shape


def test_token_grid_refuses_sizes_the_decoder_cannot_restore():
    model = VQVAE(tiny_config())
    with pytest.raises(ValueError, match="not divisible"):
        model.token_grid((1, 30, 28))
    with pytest.raises(ValueError, match="channel"):
        model.token_grid((3, 28, 28))


def test_decode_shape_and_range():
    model = VQVAE(tiny_config()).eval()
    with torch.no_grad():  # make the raw decoder output overshoot so the clamp matters
        model.decoder.layers[-1].weight.mul_(100.0)
        model.decoder.layers[-1].bias.fill_(0.5)
    tokens = torch.randint(16, (3, 7, 7), generator=torch.Generator().manual_seed(2))
    decoded = model.decode(tokens)
    assert decoded.shape == (3, 1, 28, 28) and decoded.dtype == torch.float32
    assert decoded.min() >= -1.0 and decoded.max() <= 1.0
    assert (decoded.abs() == 1.0).any()
    with pytest.raises(ValueError, match="tokens must lie"):
        model.decode(torch.full((1, 7, 7), 16))


def test_encode_never_updates_the_codebook_statistics():
    model = VQVAE(tiny_config()).train()
    before = {name: tensor.clone() for name, tensor in model.quantizer.state_dict().items()}
    model.encode(images())
    for name, tensor in model.quantizer.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_loss_backward_reaches_encoder_and_decoder():
    model = VQVAE(tiny_config()).train()
    assert model.phases(0) == ["main"]
    groups = model.param_groups()
    assert list(groups) == ["main"]
    assert {id(p) for p in groups["main"]} == {id(p) for p in model.parameters()}
    loss, metrics = model.loss({"pixel_values": images(), "label": torch.tensor([1, 2])}, "main", step=0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {"reconstruction_loss", "quantizer_loss", "usage", "perplexity", "dead_codes"} <= set(metrics)
    loss.backward()
    for part in (model.encoder, model.decoder):
        grads = [p.grad for p in part.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    with pytest.raises(ValueError, match="phase"):
        model.loss({"pixel_values": images()}, "discriminator", step=0)


def test_l1_reconstruction_loss_and_bf16_autocast():
    model = VQVAE(tiny_config(reconstruction_loss="l1")).eval()  # eval: no EMA step between the calls
    x = images()
    _, metrics = model.loss({"pixel_values": x}, "main", step=0)
    with torch.no_grad():
        error = model(x).reconstruction - x
    assert metrics["reconstruction_loss"].item() == pytest.approx(error.abs().mean().item(), rel=1e-5)
    assert metrics["reconstruction_loss"].item() != pytest.approx(error.pow(2).mean().item(), rel=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model.train().loss({"pixel_values": x}, "main", step=0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="reconstruction_loss"):
        tiny_config(reconstruction_loss="huber")


def trained_model() -> VQVAE:
    model = VQVAE(tiny_config())
    model.train()
    with torch.no_grad():  # a few training calls move the EMA buffers away from their initial values
        for seed in range(2):
            model(images(seed=seed))
    return model.eval()


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path / "tok")
    config_json = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config_json["kind"] == "vqvae" and config_json["config"]["quantizer"]["codebook_size"] == 16
    for loaded in (VQVAE.from_pretrained(tmp_path / "tok"), load_tokenizer(tmp_path / "tok")):
        assert isinstance(loaded, VQVAE) and not loaded.training
        assert loaded.config == model.config
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        x = images(seed=5)
        tokens = model.encode(x)
        assert torch.equal(loaded.encode(x), tokens)
        assert torch.equal(loaded.decode(tokens), model.decode(tokens))


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_from_pretrained_refuses_missing_or_extra_tensors(tmp_path, change):
    VQVAE(tiny_config()).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    if change == "missing":
        del tensors["quantizer.cluster_size"]
        expected = r"missing tensors \['quantizer.cluster_size'\]"
    else:
        tensors["decoder.surplus"] = torch.zeros(2)
        expected = r"unexpected tensors \['decoder.surplus'\]"
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=expected):
        VQVAE.from_pretrained(tmp_path)


def test_from_pretrained_refuses_wrong_shapes_kinds_and_missing_files(tmp_path):
    VQVAE(tiny_config()).save_pretrained(tmp_path / "tok")
    config_json = json.loads((tmp_path / "tok" / "config.json").read_text())
    config_json["config"]["embedding_dim"] = 6
    (tmp_path / "tok" / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(ValueError, match="wrong shapes"):
        VQVAE.from_pretrained(tmp_path / "tok")
    config_json["kind"] = "vqgan9000"
    (tmp_path / "tok" / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(ValueError, match="known kinds"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "empty")


def test_config_from_dict_round_trip_and_unknown_keys():
    config = tiny_config(channel_multipliers=(1, 2, 2))
    as_json = json.loads(json.dumps(dataclasses.asdict(config)))
    assert VQVAEConfig.from_dict(as_json) == config  # lists back to tuples, nested config rebuilt
    with pytest.raises(ValueError, match=r"hidden_chanels.*valid keys:.*hidden_channels"):
        VQVAEConfig.from_dict({"hidden_chanels": 3})
    with pytest.raises(ValueError, match=r"codebook_sise.*valid keys:.*codebook_size"):
        VQVAEConfig.from_dict({"quantizer": {"codebook_sise": 3}})
