"""Run by `accelerate launch --num_processes 2 --cpu` in tests/test_loop.py: a short two-group
(GAN-like) training under DDP over gloo, then every process writes what it ended with to
`<output_dir>/rank<i>.json` so that the test can check the processes agree."""

import json
import sys
from pathlib import Path

from accelerate import PartialState

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `pipelines`

from pipelines.loop import TrainConfig, train  # noqa: E402
from tiny_trainable import RegressionDataset, TwoGroupModel, flat_weights  # noqa: E402


def main(output_dir: Path) -> None:
    # CPU processes started by torchrun (`accelerate launch --multi_gpu`) only form a gloo group
    # when told they are CPU processes; `accelerate launch --cpu` alone starts a single process.
    state = PartialState(cpu=True)
    model = TwoGroupModel(seed=0)
    config = TrainConfig(
        max_steps=6, batch_size=4, learning_rate=1e-2, warmup_steps=1, log_every=2, checkpoint_every=3,
        gradient_accumulation_steps=2,
    )
    result = train(model, RegressionDataset(size=32), config, output_dir / "run", description="ddp")
    record = {
        "rank": state.process_index,
        "num_processes": state.num_processes,
        "steps": result.steps,
        "history": result.history,
        "weights": flat_weights(model).tolist(),
        "checkpoint_dir": str(result.checkpoint_dir),
    }
    (output_dir / f"rank{state.process_index}.json").write_text(json.dumps(record))
    state.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
