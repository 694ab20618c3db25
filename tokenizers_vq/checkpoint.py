"""Self-describing tokenizer folders: `config.json` ({"kind", "config"}) + `model.safetensors`.

Every tokenizer kind saves and loads the same way, so `PretrainedTokenizer` holds it once. Loading
never unpickles: the config is JSON, the weights safetensors, and the weights must match the model
built from the config tensor for tensor (`load_state_strictly` names every mismatch).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def state_mismatches(module: nn.Module, tensors: dict[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """The names `module` has and `tensors` lacks, the reverse, and the shared names of other shapes."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(name for name in set(expected) & set(tensors) if tensors[name].shape != expected[name].shape)
    return missing, unexpected, misshaped


def load_state_strictly(module: nn.Module, tensors: dict[str, Tensor], source: str | Path) -> None:
    """`module.load_state_dict(tensors, strict=True)`, with an error that names every mismatch."""
    missing, unexpected, misshaped_names = state_mismatches(module, tensors)
    expected = module.state_dict()
    misshaped = [f"{name}: file {tuple(tensors[name].shape)} vs model {tuple(expected[name].shape)}"
                 for name in misshaped_names]
    if missing or unexpected or misshaped:
        raise ValueError(
            f"{source} does not match the model built from its config.json: "
            f"missing tensors {missing}, unexpected tensors {unexpected}, wrong shapes {misshaped}"
        )
    module.load_state_dict(tensors, strict=True)


class PretrainedTokenizer:
    """Mixin for an `nn.Module` tokenizer with a dataclass `config` whose class has `kind` and `from_dict`."""

    config_class: ClassVar[type]

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        record = {"kind": self.config.kind, "config": asdict(self.config)}
        (directory / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        logger.info("saved %s tokenizer to %s", self.config.kind, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path):
        """Build from `config.json` and load `model.safetensors` strictly; returns the model in eval mode."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist; a tokenizer folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
        data = json.loads(config_path.read_text())
        kind = cls.config_class.kind
        if data.get("kind") != kind or "config" not in data:
            raise ValueError(f"{config_path} describes kind {data.get('kind')!r}, not a {kind!r} tokenizer")
        model = cls(cls.prepare_loaded_config(cls.config_class.from_dict(data["config"]), directory))
        load_state_strictly(model, load_file(weights_path), weights_path)
        return model.eval()

    @classmethod
    def prepare_loaded_config(cls, config, directory: Path):
        """Hook: adjust a config read from disk before the model is built (VQ-GAN drops missing perceptual weights)."""
        return config
