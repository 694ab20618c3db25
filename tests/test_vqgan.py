"""VQ-GAN: config, tokenizer API, the two phases and what each trains, save/load, the perceptual
file, and an interrupted-and-resumed run of the training loop that equals an uninterrupted one."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from test_losses import tiny_perceptual_tensors

from pipelines.loop import TrainConfig, train
from pipelines.train_state import list_checkpoints, read_train_state
from tokenizers_vq.nets.discriminators import DiscriminatorConfig, PatchGANDiscriminator
from tokenizers_vq.quantizers.vq import VQConfig
from tokenizers_vq.vqgan import VQGAN, VQGANConfig
from tokenizers_vq.vqvae import VQVAEConfig

TINY = {
    "autoencoder": {
        "in_channels": 3, "hidden_channels": 8, "channel_multipliers": [1], "embedding_dim": 4,
        "reconstruction_loss": "l1", "quantizer": {"codebook_size": 16},
    },
    "discriminator": {"base_channels": 4, "num_layers": 2},
    "discriminator_start": 2,
    "lecam_weight": 0.1,
}  # fmt: skip


def tiny_config(**overrides) -> VQGANConfig:
    return VQGANConfig.from_dict({**TINY, **overrides})


def tiny_model(seed: int = 0, **overrides) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(tiny_config(**overrides))


def images(count: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_config_builds_nested_configs_and_rejects_unknown_keys():
    config = tiny_config()
    assert config.autoencoder == VQVAEConfig(in_channels=3, hidden_channels=8, channel_multipliers=(1,),
                                             embedding_dim=4, reconstruction_loss="l1",
                                             quantizer=VQConfig(codebook_size=16))
    assert config.discriminator == DiscriminatorConfig(base_channels=4, num_layers=2)
    with pytest.raises(ValueError, match=r"discriminator_strat.*valid keys:.*discriminator_start"):
        VQGANConfig.from_dict({"discriminator_strat": 3})
    with pytest.raises(ValueError, match="valid keys"):
        VQGANConfig.from_dict({"discriminator": {"layers": 2}})
    with pytest.raises(ValueError, match="gan_loss"):
        VQGANConfig(gan_loss="wasserstein")
    with pytest.raises(ValueError, match="perceptual_weights_path"):
        VQGANConfig(perceptual_weight=1.0)


def test_tokenizer_api_is_the_inner_vqvae_s():
    model = tiny_model().eval()
    x = images()
    tokens = model.encode(x)
    assert tokens.shape == (4, 8, 8) and tokens.dtype == torch.int64
    assert model.vocab_size == 16 and model.token_grid((3, 16, 16)) == (8, 8)
    assert torch.equal(tokens, model.vqvae.encode(x))
    decoded = model.decode(tokens)
    assert decoded.shape == x.shape and decoded.abs().max() <= 1.0
    assert model(x).indices.shape == (4, 8, 8)
    assert model.last_decoder_layer() is model.vqvae.decoder.layers[-1]


def test_patchgan_output_grid():
    discriminator = PatchGANDiscriminator(DiscriminatorConfig(base_channels=4, num_layers=2), in_channels=3)
    assert discriminator(images()).shape == (4, 1, 2, 2) and discriminator.output_size(16, 16) == (2, 2)
    with pytest.raises(ValueError, match="too small"):
        PatchGANDiscriminator(DiscriminatorConfig(base_channels=4, num_layers=3), in_channels=3)(images())


def test_phases_are_generator_only_before_the_start_then_alternate():
    model = tiny_model()
    assert [model.phases(step) for step in range(4)] == [
        ["generator"], ["generator"], ["generator", "discriminator"], ["generator", "discriminator"]
    ]
    groups = model.param_groups()
    assert set(groups) == {"generator", "discriminator"}
    assert {id(p) for p in groups["generator"]} == {id(p) for p in model.vqvae.parameters()}
    assert {id(p) for p in groups["discriminator"]} == {id(p) for p in model.discriminator.parameters()}


def gradients_present(module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_generator_phase_trains_the_autoencoder_only():
    model = tiny_model()
    batch = {"pixel_values": images()}
    loss, metrics = model.loss(batch, "generator", step=0)  # before the start: no GAN term
    assert metrics["g_loss"] == 0 and metrics["adaptive_weight"] == 0
    assert {"reconstruction_loss", "quantizer_loss", "usage", "perplexity"} <= set(metrics)
    loss.backward()
    assert gradients_present(model.vqvae) and not gradients_present(model.discriminator)

    model.zero_grad(set_to_none=True)
    loss, metrics = model.loss(batch, "generator", step=2)
    assert metrics["g_loss"] != 0 and metrics["adaptive_weight"] > 0
    gan_term = 0.1 * metrics["adaptive_weight"] * metrics["g_loss"]  # discriminator_weight 0.1
    expected = metrics["reconstruction_loss"] + metrics["quantizer_loss"] + gan_term
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    assert gradients_present(model.vqvae)
    assert all(p.grad is None for p in model.discriminator.parameters())  # the D weights stay out of the graph


def test_discriminator_phase_trains_the_discriminator_only_and_leaves_the_codebook_alone():
    model = tiny_model()
    quantizer_state = {k: v.clone() for k, v in model.vqvae.quantizer.state_dict().items()}
    loss, metrics = model.loss({"pixel_values": images()}, "discriminator", step=2)
    assert {"d_loss", "lecam_loss", "logits_real", "logits_fake"} <= set(metrics)
    loss.backward()
    assert gradients_present(model.discriminator)
    assert all(p.grad is None for p in model.vqvae.parameters())
    assert model.vqvae.training  # switched back after the no-update reconstruction
    for name, value in model.vqvae.quantizer.state_dict().items():
        assert torch.equal(value, quantizer_state[name]), name
    assert bool(model.lecam.initialized) and model.lecam.ema_logits_real.item() == pytest.approx(
        metrics["logits_real"].item()
    )


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model(gan_loss="non_saturating")
    model.loss({"pixel_values": images()}, "discriminator", step=2)  # non-default LeCAM buffers
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["kind"] == "vqgan" and saved["config"]["gan_loss"] == "non_saturating"
    loaded = VQGAN.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    assert any(name.startswith("discriminator.") for name in loaded.state_dict())
    assert torch.equal(loaded.encode(images()), model.eval().encode(images()))

    other = tiny_model(discriminator={"base_channels": 8, "num_layers": 2})
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="wrong shapes"):
        VQGAN.from_pretrained(tmp_path / "other")


@pytest.mark.parametrize(
    "quantizer, token_shape",
    [({"kind": "lfq", "bits": 4}, (2, 8, 8)), ({"kind": "residual_vq", "num_quantizers": 2}, (2, 8, 8, 2))],
)
def test_any_quantizer_of_the_inner_vqvae_trains_and_round_trips(tmp_path, quantizer, token_shape):
    autoencoder = {**TINY["autoencoder"], "quantizer": quantizer}
    model = tiny_model(autoencoder=autoencoder)
    assert model.vqvae.config.quantizer.kind == quantizer["kind"]
    for phase in ("generator", "discriminator"):
        loss, _ = model.loss({"pixel_values": images(2)}, phase, step=2)
        loss.backward()
    assert gradients_present(model.vqvae) and gradients_present(model.discriminator)
    model.save_pretrained(tmp_path)
    loaded = VQGAN.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert loaded.num_codebooks == (token_shape[-1] if len(token_shape) == 4 else 1)
    tokens = loaded.encode(images(2))
    assert tokens.shape == token_shape and torch.equal(tokens, model.eval().encode(images(2)))


def test_perceptual_path_given_but_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.safetensors.*does not exist"):
        tiny_model(perceptual_weight=1.0, perceptual_weights_path=str(tmp_path / "absent.safetensors"))


def test_perceptual_loss_joins_the_generator_loss_but_not_the_checkpoint(tmp_path, caplog):
    path = tmp_path / "lpips.safetensors"
    save_file(tiny_perceptual_tensors(), path)
    model = tiny_model(perceptual_weight=0.5, perceptual_weights_path=str(path))
    assert model.perceptual is not None
    assert not any("perceptual" in name for name in model.state_dict())
    loss, metrics = model.loss({"pixel_values": images()}, "generator", step=0)
    expected = metrics["reconstruction_loss"] + 0.5 * metrics["perceptual_loss"] + metrics["quantizer_loss"]
    assert metrics["perceptual_loss"] > 0 and loss.item() == pytest.approx(expected.item(), rel=1e-5)
    model.to(torch.float64)  # the hidden network follows the model's conversions
    assert model.perceptual.shift.dtype == torch.float64

    model.to(torch.float32).save_pretrained(tmp_path / "tokenizer")
    assert VQGAN.from_pretrained(tmp_path / "tokenizer").perceptual is not None
    path.unlink()
    with caplog.at_level(logging.WARNING):
        loaded = VQGAN.from_pretrained(tmp_path / "tokenizer")
    assert loaded.perceptual is None and "without the perceptual loss" in caplog.text


class SimulatedCrash(RuntimeError):
    pass


class CrashingVQGAN(VQGAN):
    crash_at_step = None

    def loss(self, batch, phase, step):
        if step == self.crash_at_step:
            raise SimulatedCrash(f"simulated crash at step {step}")
        return super().loss(batch, phase, step)


def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path):
    dataset = [{"pixel_values": image} for image in images(count=16, seed=3)]
    config = TrainConfig(max_steps=6, batch_size=4, learning_rate=1e-3, warmup_steps=1, log_every=1,
                         checkpoint_every=3, seed=0)
    torch.manual_seed(0)
    uninterrupted = CrashingVQGAN(tiny_config())
    expected = train(uninterrupted, dataset, config, tmp_path / "a")

    torch.manual_seed(0)
    crashing = CrashingVQGAN(tiny_config())
    crashing.crash_at_step = 3
    with pytest.raises(SimulatedCrash):
        train(crashing, dataset, config, tmp_path / "b")
    assert read_train_state(list_checkpoints(tmp_path / "b")[-1]).step == 3
    torch.manual_seed(123)  # other weights: everything must come from the checkpoint
    resumed = CrashingVQGAN(tiny_config())
    result = train(resumed, dataset, config, tmp_path / "b", resume=True)

    assert result.steps == expected.steps == 6
    assert result.history == expected.history
    # The discriminator trains from step index 2 (the third step) on, and only then.
    with_discriminator = [entry["step"] for entry in expected.history if "discriminator/d_loss" in entry]
    assert with_discriminator == [3, 4, 5, 6]
    assert all(entry["generator/g_loss"] == 0 for entry in expected.history[:2])
    assert all(entry["generator/adaptive_weight"] > 0 for entry in expected.history[2:])
    assert bool(uninterrupted.lecam.initialized)
    state, resumed_state = uninterrupted.state_dict(), resumed.state_dict()
    assert set(state) == set(resumed_state)
    for name, value in state.items():  # generator, discriminator and LeCAM buffers, bitwise
        assert torch.equal(value, resumed_state[name]), name
