"""The weight average (`TrainConfig.ema_decay`): its arithmetic, its swap in and out, evaluation and
the trained model see it, checkpoints keep it for an exact resume, and fingerprints without it stay."""

import pytest
import torch
from helpers.tiny_trainable import RegressionDataset, SimulatedCrash, TinyRegressor, flat_weights
from safetensors.torch import load_file
from torch import nn

from pipelines.loop import LossModule, TrainConfig, train
from pipelines.train_state import list_checkpoints
from pipelines.weight_average import WEIGHT_AVERAGE_FILE, WeightAverage


def small_config(**overrides) -> TrainConfig:
    values = dict(max_steps=12, batch_size=8, learning_rate=1e-2, warmup_steps=2, log_every=1, checkpoint_every=3,
                  ema_decay=0.9)
    return TrainConfig(**{**values, **overrides})


def test_average_follows_the_warmed_up_exponential_formula():
    model = nn.Linear(3, 2)
    model.register_buffer("counter", torch.zeros((), dtype=torch.long))  # integer: not averaged
    average = WeightAverage(model, decay=0.5)
    expected = model.weight.detach().clone()
    for n in range(10):
        with torch.no_grad():
            model.weight.add_(1.0)
        decay = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.18, ..., capped at 0.5 from n = 8 on
        expected = decay * expected + (1 - decay) * model.weight.detach()
        average.update(model)
    torch.testing.assert_close(average.shadow["weight"], expected)
    assert "counter" not in average.shadow and average.updates == 10


def test_swapped_in_restores_the_live_weights_exactly():
    model = nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.mul_(3.0)
    live = flat(model)
    with average.swapped_in(model):
        assert not torch.equal(flat(model), live)
        torch.testing.assert_close(model.weight, average.shadow["weight"])
    assert torch.equal(flat(model), live)


def test_save_and_load_round_trip_and_refuse_a_missing_or_foreign_file(tmp_path):
    model = nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(model)
    average.save(tmp_path)
    restored = WeightAverage(nn.Linear(3, 2), decay=0.9)
    restored.load(tmp_path)
    assert restored.updates == 1 and torch.equal(restored.shadow["weight"], average.shadow["weight"])
    with pytest.raises(ValueError, match="ema_decay=0"):
        restored.load(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="does not fit"):
        WeightAverage(nn.Linear(3, 2, bias=False), decay=0.9).load(tmp_path)
    with pytest.raises(ValueError, match="shape"):
        WeightAverage(nn.Linear(4, 2), decay=0.9).load(tmp_path)


def test_evaluation_and_the_trained_model_see_the_average_and_checkpoints_the_live_weights(tmp_path):
    seen = {}

    def remember(model, step):
        seen[step] = flat(model)
        return {"val": 0.0}

    model = TinyRegressor(seed=0)
    result = train(model, RegressionDataset(), small_config(eval_every=6), tmp_path, eval_fn=remember)
    assert sorted(seen) == [6, 12]
    assert torch.equal(flat_weights(model), seen[12])  # the returned model is what the last evaluation scored
    average = load_file(result.checkpoint_dir / WEIGHT_AVERAGE_FILE)
    live = load_file(result.checkpoint_dir / "model.safetensors")
    torch.testing.assert_close(average["net.0.weight"], model.net[0].weight.detach())
    assert not torch.equal(live["model.net.0.weight"], average["net.0.weight"])

    plain = TinyRegressor(seed=0)
    train(plain, RegressionDataset(), small_config(ema_decay=0.0), tmp_path / "plain")
    torch.testing.assert_close(flat_weights(plain), live_flat(live))  # averaging never changes the live run


def test_resume_with_an_average_equals_uninterrupted(tmp_path):
    config = small_config()
    uninterrupted = TinyRegressor(seed=0)
    train(uninterrupted, RegressionDataset(), config, tmp_path / "a")
    with pytest.raises(SimulatedCrash):
        train(TinyRegressor(seed=0, crash_at_step=7), RegressionDataset(), config, tmp_path / "b")
    resumed = TinyRegressor(seed=5)
    train(resumed, RegressionDataset(), config, tmp_path / "b", resume=True)
    assert torch.equal(flat_weights(resumed), flat_weights(uninterrupted))


def test_resuming_a_run_saved_without_an_average_is_refused(tmp_path):
    train(TinyRegressor(seed=0), RegressionDataset(), small_config(ema_decay=0.0, max_steps=3), tmp_path)
    assert list_checkpoints(tmp_path)
    with pytest.raises(ValueError, match="ema_decay=0"):
        train(TinyRegressor(seed=0), RegressionDataset(), small_config(max_steps=6), tmp_path, resume=True)


def test_identity_names_ema_decay_only_when_on_and_bad_values_are_refused():
    assert "ema_decay" not in TrainConfig().identity()
    assert "ema_decay=0.999" in TrainConfig(ema_decay=0.999).identity()
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="ema_decay"):
            TrainConfig(ema_decay=bad)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def live_flat(state: dict) -> torch.Tensor:
    module = LossModule(TinyRegressor())
    module.load_state_dict(state)
    return flat_weights(module.model)
