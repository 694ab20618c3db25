"""The training loop: it learns, resumes exactly, accumulates, stops on NaN, respects phases, and
runs twice in one process and across two CPU processes."""

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from helpers.tiny_trainable import RegressionDataset, SimulatedCrash, TinyRegressor, TwoGroupModel, flat_weights
from safetensors.torch import load_file

from pipelines.loop import LossModule, TrainConfig, TrainingDivergedError, learning_rate_factor, train
from pipelines.train_state import list_checkpoints, read_train_state

HELPERS = Path(__file__).resolve().parent / "helpers"


def small_config(**overrides) -> TrainConfig:
    values = dict(
        max_steps=12, batch_size=8, learning_rate=1e-2, warmup_steps=2, log_every=1, checkpoint_every=3, seed=0
    )
    return TrainConfig(**{**values, **overrides})


def test_config_from_dict_rejects_unknown_keys_and_builds_tuples():
    config = TrainConfig.from_dict({"max_steps": 5, "betas": [0.8, 0.9], "group_learning_rates": {"a": 1.0}})
    assert config.betas == (0.8, 0.9) and config.group_learning_rates == {"a": 1.0}
    with pytest.raises(ValueError, match=r"max_stepz.*\[TrainConfig\].*valid keys:.*max_steps"):
        TrainConfig.from_dict({"max_stepz": 5})
    with pytest.raises(ValueError, match=r"\[prior_training\]"):
        TrainConfig.from_dict({"max_stepz": 5}, "prior_training")
    with pytest.raises(ValueError, match="cosine"):
        TrainConfig(lr_schedule="cosnie")


def test_learning_rate_schedule_warms_up_then_decays_to_its_floor():
    config = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate_factor(0, config) == pytest.approx(0.1)
    assert learning_rate_factor(9, config) == pytest.approx(1.0)
    assert learning_rate_factor(10, config) == pytest.approx(1.0)
    assert learning_rate_factor(100, config) == pytest.approx(0.1)
    linear = TrainConfig(max_steps=100, warmup_steps=0, lr_schedule="linear", min_lr_ratio=0.0)
    assert learning_rate_factor(50, linear) == pytest.approx(0.5)
    assert learning_rate_factor(77, TrainConfig(lr_schedule="constant", warmup_steps=0)) == 1.0


def test_loss_decreases(tmp_path):
    model = TinyRegressor(dropout=0.0)
    result = train(model, RegressionDataset(), small_config(max_steps=40, log_every=10), tmp_path)
    assert result.steps == 40 and [entry["step"] for entry in result.history] == [10, 20, 30, 40]
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    assert result.final_metrics["loss"] == result.history[-1]["loss"]
    assert result.checkpoint_dir is not None and read_train_state(result.checkpoint_dir).step == 40


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_equals_uninterrupted(tmp_path, accumulation):
    # With 40 examples an epoch ends mid-run, so the resumed run must skip into the middle of one.
    config = small_config(batch_size=8 // accumulation, gradient_accumulation_steps=accumulation)
    uninterrupted = TinyRegressor(seed=0)
    expected = train(uninterrupted, RegressionDataset(), config, tmp_path / "a")

    with pytest.raises(SimulatedCrash):
        train(TinyRegressor(seed=0, crash_at_step=7), RegressionDataset(), config, tmp_path / "b")
    assert read_train_state(list_checkpoints(tmp_path / "b")[-1]).step == 6
    resumed_model = TinyRegressor(seed=123)  # other weights: everything must come from the checkpoint
    resumed = train(resumed_model, RegressionDataset(), config, tmp_path / "b", resume=True)

    assert resumed.steps == expected.steps == 12
    assert resumed.history == expected.history  # bitwise-equal logged losses, before and after step 6
    assert torch.equal(flat_weights(resumed_model), flat_weights(uninterrupted))


def test_max_minutes_stops_at_a_log_step_with_a_checkpoint_and_resume_goes_on(tmp_path, caplog):
    # A budget already spent: the first log step (every 4) ends the call, evaluated and checkpointed.
    config = small_config(log_every=4, checkpoint_every=100, max_minutes=1e-9)
    with caplog.at_level(logging.WARNING):
        stopped = train(TinyRegressor(seed=0), RegressionDataset(), config, tmp_path,
                        eval_fn=lambda module, step: {"val": 1.0})
    assert stopped.steps == 4 and stopped.history[-1]["step"] == 4 and stopped.history[-1]["val"] == 1.0
    assert read_train_state(stopped.checkpoint_dir).step == 4
    assert "stopping at step 4 of 12" in caplog.text
    unlimited = dataclasses.replace(config, max_minutes=0.0)
    resumed = train(TinyRegressor(seed=1), RegressionDataset(), unlimited, tmp_path, resume=True)
    assert resumed.steps == 12
    with pytest.raises(ValueError, match="max_minutes"):
        small_config(max_minutes=-1.0)


def test_gradient_accumulation_matches_full_batch(tmp_path):
    config = small_config(max_steps=6, checkpoint_every=0)
    full = TinyRegressor(dropout=0.0)
    train(full, RegressionDataset(), config, tmp_path / "full")
    halves = TinyRegressor(dropout=0.0)
    halved = small_config(max_steps=6, checkpoint_every=0, batch_size=4, gradient_accumulation_steps=2)
    train(halves, RegressionDataset(), halved, tmp_path / "halves")
    assert not torch.equal(flat_weights(full), flat_weights(TinyRegressor(dropout=0.0)))
    torch.testing.assert_close(flat_weights(halves), flat_weights(full), rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = small_config(checkpoint_every=2)
    with pytest.raises(TrainingDivergedError, match=r"step 5.*checkpoint_1 \(step 4\)") as caught:
        train(TinyRegressor(nan_at_step=5), RegressionDataset(), config, tmp_path)
    assert isinstance(caught.value, RuntimeError) and caught.value.step == 5
    assert caught.value.last_checkpoint == list_checkpoints(tmp_path)[-1]
    assert [read_train_state(path).step for path in list_checkpoints(tmp_path)] == [2, 4]

    weights = load_file(caught.value.last_checkpoint / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    LossModule(TinyRegressor()).load_state_dict(weights, strict=True)
    resumed = train(TinyRegressor(), RegressionDataset(), config, tmp_path, resume=True)
    assert resumed.steps == 12 and torch.isfinite(torch.tensor(resumed.final_metrics["loss"]))


def test_eval_fn_runs_in_eval_mode_on_schedule_and_at_the_end(tmp_path):
    seen = []

    def evaluate(model, step):
        seen.append((step, model.training))
        return {"eval_loss": torch.tensor(float(step))}

    config = small_config(max_steps=5, eval_every=2, log_every=2, checkpoint_every=0)
    model = TinyRegressor()
    result = train(model, RegressionDataset(), config, tmp_path, eval_fn=evaluate)
    assert seen == [(2, False), (4, False), (5, False)] and model.training
    assert [entry["step"] for entry in result.history] == [2, 4, 5]
    assert all(set(entry) == {"step", "loss", "abs_error", "grad_norm", "lr", "eval_loss"} for entry in result.history)
    assert result.final_metrics["eval_loss"] == 5.0


def test_non_finite_gradients_also_stop_training(tmp_path):
    class InfiniteGradient(TinyRegressor):
        def loss(self, batch, phase, step):
            loss, metrics = super().loss(batch, phase, step)
            # A finite loss whose gradient is not: sqrt has an infinite slope at 0 (inf * 0 = nan).
            return (loss + torch.sqrt(self.net[0].weight.sum() * 0) if step == 3 else loss), metrics

    with pytest.raises(TrainingDivergedError, match="step 3"):
        train(InfiniteGradient(), RegressionDataset(), small_config(), tmp_path)
    assert [read_train_state(path).step for path in list_checkpoints(tmp_path)] == [3]


@pytest.mark.parametrize("trained", [["generator"], ["critic"], ["generator", "critic"]])
def test_phases_update_only_their_own_group(tmp_path, trained):
    model = TwoGroupModel(phase_schedule=lambda step: trained)
    before = {name: flat_weights(getattr(model, name)) for name in ("generator", "critic")}
    config = small_config(max_steps=3, checkpoint_every=0, gradient_accumulation_steps=2, batch_size=4)
    result = train(model, RegressionDataset(), config, tmp_path)
    for name, weights in before.items():
        assert torch.equal(weights, flat_weights(getattr(model, name))) == (name not in trained), name
    assert model.calls[: 2 * len(trained)] == [(phase, 0) for phase in trained for _ in range(2)]
    assert set(result.final_metrics) >= {f"{phase}/loss" for phase in trained}


def test_group_learning_rates_override_the_base_rate(tmp_path):
    config = small_config(max_steps=2, checkpoint_every=0, warmup_steps=0, lr_schedule="constant",
                          group_learning_rates={"critic": 0.5})  # fmt: skip
    result = train(TwoGroupModel(), RegressionDataset(), config, tmp_path)
    assert result.final_metrics["critic/lr"] == 0.5 and result.final_metrics["generator/lr"] == 1e-2


def test_two_trainings_in_one_process_with_different_precision(tmp_path):
    first = train(TinyRegressor(), RegressionDataset(), small_config(max_steps=3), tmp_path / "fp32")
    second = train(TinyRegressor(), RegressionDataset(), small_config(max_steps=3, mixed_precision="bf16"),
                   tmp_path / "bf16")  # fmt: skip
    third = train(TinyRegressor(), RegressionDataset(), small_config(max_steps=3), tmp_path / "again")
    assert first.steps == second.steps == third.steps == 3
    assert first.history == third.history  # nothing of the bf16 run leaked into the next one


def test_one_accelerator_reused_across_stages(tmp_path):
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision="no")
    project_configuration = accelerator.project_configuration
    train(TinyRegressor(), RegressionDataset(), small_config(max_steps=3), tmp_path / "one", accelerator=accelerator)
    result = train(TwoGroupModel(), RegressionDataset(), small_config(max_steps=3), tmp_path / "two",
                   accelerator=accelerator)  # fmt: skip
    saved = sorted(path.name for path in result.checkpoint_dir.iterdir())
    assert "model_1.safetensors" not in saved  # the first stage's model is not saved again
    assert all(key.startswith(("model.generator", "model.critic")) for key in load_file(
        result.checkpoint_dir / "model.safetensors"))  # fmt: skip
    assert accelerator.project_configuration is project_configuration


def test_resume_without_checkpoint_starts_fresh_and_refuses_to_overwrite(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipelines"):
        result = train(TinyRegressor(), RegressionDataset(), small_config(max_steps=3), tmp_path, resume=True)
    assert result.steps == 3 and "no complete checkpoint" in caplog.text
    with pytest.raises(ValueError, match="resume=True"):
        train(TinyRegressor(), RegressionDataset(), small_config(max_steps=3), tmp_path)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_cpu_processes_train_and_agree(tmp_path):
    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the `accelerate` launcher is not installed")
    # `--cpu` alone would start one process (it expects mpirun); torchrun starts two, and the script
    # asks for CPU so that they join a gloo group.
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(HELPERS / "ddp_train.py"), str(tmp_path),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=180, env=environment)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [record["num_processes"] for record in records] == [2, 2]
    assert records[0]["steps"] == 6 and records[0]["history"][-1]["step"] == 6
    assert records[0]["weights"] == records[1]["weights"]  # DDP kept the replicas identical
    assert records[0]["history"] == records[1]["history"]  # metrics are averaged over processes
    assert [read_train_state(path).step for path in list_checkpoints(tmp_path / "run")] == [3, 6]


def test_l2_weight_decay_is_a_penalty_in_the_loss_and_decoupled_decay_is_not():
    """weight_decay_mode="l2": one step equals plain Adam on loss + (wd / 2) |W|^2 for matrices (biases
    untouched); the default decoupled mode takes a different step."""
    from pipelines.loop import build_optimizers

    def one_step(mode: str, penalty_in_loss: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = TinyRegressor()
        config = small_config(weight_decay=0.0 if penalty_in_loss else 0.5, weight_decay_mode=mode)
        optimizers, _ = build_optimizers(model, config)
        x, y = torch.randn(8, 4), torch.randn(8, 1)
        loss, _ = model.loss({"x": x, "y": y}, "main", 0)
        if penalty_in_loss:
            loss = loss + 0.25 * sum((p**2).sum() for p in model.parameters() if p.ndim >= 2)
        loss.backward()
        for optimizer in optimizers.values():
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    reference = one_step("l2", penalty_in_loss=True)
    for got, want in zip(one_step("l2", penalty_in_loss=False), reference):
        torch.testing.assert_close(got, want)
    decoupled = one_step("decoupled", penalty_in_loss=False)
    assert any(not torch.allclose(got, want) for got, want in zip(decoupled, reference))
    with pytest.raises(ValueError, match="weight_decay_mode"):
        TrainConfig(weight_decay_mode="coupled")
