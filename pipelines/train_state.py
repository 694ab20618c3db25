"""Checkpoints of the training loop: its own small state, and saving and finding complete checkpoints.

Accelerate's `save_state` stores the model (safetensors), the optimizers, the gradient scaler and
the RNG states in `output_dir/checkpoints/checkpoint_N` (its automatic naming: N counts saves, not
steps). The loop adds one small JSON file, `train_state.json`, holding the optimizer-step counter,
the metric history and the partly filled logging window, so that a resumed run logs exactly what an
uninterrupted one would. The file is written last, after every process has saved, so it doubles as
the marker of a complete checkpoint: a folder without it (a run killed mid-save) is never resumed
from. JSON rather than `register_for_checkpointing`, whose `custom_checkpoint_N.pkl` Accelerate
unpickles with `weights_only=False`, and whose registry cannot be cleared when one Accelerator is
reused across training stages. Exact resume follows the recipe of the Accelerate docs
("Checkpointing", https://huggingface.co/docs/accelerate/usage_guides/checkpoint).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

TRAIN_STATE_FILE = "train_state.json"
CHECKPOINTS_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)$")

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything the loop itself must remember between an interruption and a resume.

    `step` counts optimizer steps (updates after gradient accumulation). `window` holds the sums of
    metrics since the last log line and how many steps they cover; `history` is every logged line.
    """

    step: int = 0
    history: list[dict] = field(default_factory=list)
    window_sums: dict[str, float] = field(default_factory=dict)
    window_count: int = 0

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "history": self.history,
            "window_sums": self.window_sums,
            "window_count": self.window_count,
        }

    def load_state_dict(self, state: dict) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"train state has keys {sorted(state)}, expected {sorted(expected)}")
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.window_sums = {key: float(value) for key, value in state["window_sums"].items()}
        self.window_count = int(state["window_count"])

    def add_to_window(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.window_sums[key] = self.window_sums.get(key, 0.0) + value
        self.window_count += 1

    def take_window_means(self) -> dict[str, float]:
        """The mean of each metric since the last call, emptying the window."""
        if self.window_count == 0:
            return {}
        means = {key: total / self.window_count for key, total in self.window_sums.items()}
        self.window_sums, self.window_count = {}, 0
        return means


def checkpoint_number(path: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Every `checkpoint_N` folder under `output_dir/checkpoints`, complete or not, by N."""
    directory = Path(output_dir) / CHECKPOINTS_DIR
    if not directory.is_dir():
        return []
    folders = [path for path in directory.iterdir() if path.is_dir() and checkpoint_number(path) is not None]
    return sorted(folders, key=checkpoint_number)


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose train state was written, i.e. whose save finished."""
    complete = [path for path in list_checkpoints(output_dir) if (path / TRAIN_STATE_FILE).is_file()]
    return complete[-1] if complete else None


def write_train_state(checkpoint_dir: Path, state: TrainState) -> None:
    # Write then rename, so that a crash mid-write never leaves a half file that looks complete.
    path = Path(checkpoint_dir) / TRAIN_STATE_FILE
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(state.state_dict(), indent=1))
    temporary.replace(path)


def read_train_state(checkpoint_dir: Path) -> TrainState:
    state = TrainState()
    state.load_state_dict(json.loads((Path(checkpoint_dir) / TRAIN_STATE_FILE).read_text()))
    return state


def checkpoint_step(checkpoint_dir: Path | None) -> int | None:
    """The optimizer step a complete checkpoint was taken at (None when there is none)."""
    if checkpoint_dir is None or not (Path(checkpoint_dir) / TRAIN_STATE_FILE).is_file():
        return None
    return read_train_state(checkpoint_dir).step


def save_checkpoint(accelerator, state: TrainState, weight_average=None) -> Path:
    """`save_state` on every process, then the weight average (if any), then the train state, written
    last to mark completion."""
    location = Path(accelerator.save_state())
    if accelerator.is_main_process:
        if weight_average is not None:
            weight_average.save(location)
        write_train_state(location, state)
    accelerator.wait_for_everyone()
    return location


def restore_checkpoint(
    accelerator, output_dir: Path, resume: bool, checkpointing: bool, description: str = "train"
) -> tuple[TrainState, Path | None]:
    """Load the newest complete checkpoint when resuming; number the next save past every folder.

    Returns the train state to continue from and the checkpoint it came from (None for a fresh start).
    """
    state, last_checkpoint = TrainState(), None
    existing = list_checkpoints(output_dir)
    if resume:
        last_checkpoint = latest_complete_checkpoint(output_dir)
        if last_checkpoint is None:
            where = Path(output_dir) / CHECKPOINTS_DIR
            logger.info("%s: no complete checkpoint in %s; starting at step 0", description, where)
        else:
            accelerator.load_state(str(last_checkpoint))
            state = read_train_state(last_checkpoint)
            logger.info("%s: resumed from %s at step %d", description, last_checkpoint, state.step)
    elif existing and checkpointing:
        raise ValueError(
            f"{Path(output_dir) / CHECKPOINTS_DIR} already holds checkpoints; "
            "pass resume=True or use an empty output_dir"
        )
    # Accelerate names the next save checkpoint_<iteration>; a folder of that name must not exist.
    accelerator.project_configuration.iteration = checkpoint_number(existing[-1]) + 1 if existing else 0
    return state, last_checkpoint
