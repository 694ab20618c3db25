"""A small CNN classifier that tokgen trains itself, to measure the quality of generated images.

Sample-quality metrics such as FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update
Rule Converge to a Local Nash Equilibrium") and the Inception score measure samples in the feature
space of a pretrained Inception network. Those weights cannot be downloaded here, and Inception
features are a poor fit for 28x28 digits anyway, so tokgen trains a small convolutional network
(LeCun et al. 1998, "Gradient-Based Learning Applied to Document Recognition") on the run's own
train split and uses its logits (class accuracy of conditional samples) and its penultimate layer
(Frechet distance) instead. Numbers in this space compare runs on the same data; they are not
comparable with published FIDs. A trained classifier is cached beside the run and reused only when
the recorded fingerprint of its data and config matches, so that every run is measured in the
same space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn

from pipelines.config_tables import build_dataclass

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
KIND = "image_classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    channels: tuple[int, ...] = (32, 64)   # one conv + pool stage per entry
    feature_dim: int = 128                 # width of the penultimate layer (the Frechet feature space)
    epochs: int = 3
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    augment: bool = True                   # random shifts of up to `max_shift` pixels
    max_shift: int = 2

    def __post_init__(self):
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"channels must be non-empty and positive, got {self.channels}")
        if self.feature_dim <= 0 or self.epochs <= 0 or self.batch_size <= 0 or self.learning_rate <= 0:
            raise ValueError("feature_dim, epochs, batch_size and learning_rate must be positive")
        if self.max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {self.max_shift}")

    @classmethod
    def from_dict(cls, data: dict) -> "ClassifierConfig":
        return build_dataclass(cls, data, "classifier")


def as_image_tensor(images) -> torch.Tensor:
    """Dataset images (tensor or numpy; uint8 or float; channels first or last) -> float32 (b c h w).

    Float input is taken to be in [-1, 1] already; uint8 input is rescaled from [0, 255].
    """
    tensor = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 127.5 - 1.0
    tensor = tensor.float()
    if tensor.ndim == 3:                       # (b h w) grayscale
        tensor = rearrange(tensor, "b h w -> b 1 h w")
    elif tensor.ndim == 4 and tensor.shape[-1] in (1, 3) and tensor.shape[1] not in (1, 3):
        tensor = rearrange(tensor, "b h w c -> b c h w")
    if tensor.ndim != 4:
        raise ValueError(f"expected images (b c h w), got shape {tuple(tensor.shape)}")
    return tensor.contiguous()


def as_label_tensor(labels) -> torch.Tensor:
    """Class labels (tensor, numpy or list) -> int64 (b,) on the CPU."""
    return torch.as_tensor(labels if torch.is_tensor(labels) else np.asarray(labels)).long().cpu()


class ImageClassifier(nn.Module):
    """conv3x3 -> maxpool -> BatchNorm -> ReLU per stage, then a ReLU feature layer and a linear head."""

    def __init__(self, config: ClassifierConfig, num_classes: int, in_channels: int, image_size: tuple[int, int]):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = (int(image_size[0]), int(image_size[1]))
        stages, width = [], in_channels
        height, breadth = self.image_size
        for channels in config.channels:
            # Pooling before normalisation and ReLU runs those on a quarter of the activations.
            stages += [nn.Conv2d(width, channels, 3, padding=1, bias=False), nn.MaxPool2d(2),
                       nn.BatchNorm2d(channels), nn.ReLU()]
            width, height, breadth = channels, height // 2, breadth // 2
        if height < 1 or breadth < 1:
            raise ValueError(f"image size {self.image_size} is too small for {len(config.channels)} pooling stages")
        self.stages = nn.Sequential(*stages)
        self.feature_layer = nn.Linear(width * height * breadth, config.feature_dim)
        self.head = nn.Linear(config.feature_dim, num_classes)
        # Channels-last convolutions measured 1.7x faster on CPU (oneDNN) for this network; loading
        # weights copies into these tensors, so the layout survives save/load.
        self.to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(b c h w) in [-1, 1] -> (b feature_dim), the penultimate activations."""
        hidden = rearrange(self.stages(x.contiguous(memory_format=torch.channels_last)), "b c h w -> b (c h w)")
        return F.relu(self.feature_layer(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _initialize(model: nn.Module, generator: torch.Generator) -> None:
    # PyTorch's default initialisation (Kaiming-uniform with a = sqrt(5)), drawn from the caller's
    # generator so that training is reproducible without touching torch's global RNG. Plain He
    # init was tried: its larger initial logits cost about 1.5 points of MNIST accuracy in 3 epochs.
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift] (edge-replicated)."""
    batch, _, height, width = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (2, batch), generator=generator).to(x.device)
    rows = offsets[0, :, None] + torch.arange(height, device=x.device)     # (b h)
    cols = offsets[1, :, None] + torch.arange(width, device=x.device)      # (b w)
    batch_index = torch.arange(batch, device=x.device)[:, None, None, None]
    channel_index = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


@torch.no_grad()
def classifier_logits(model: ImageClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(n c h w) -> (n num_classes) logits on the CPU, evaluated in batches on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = [model(chunk.to(device).float()).float().cpu() for chunk in images.split(batch_size)]
    model.train(was_training)
    return torch.cat(logits)


@torch.no_grad()
def classifier_features(model: ImageClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(n c h w) -> (n feature_dim) penultimate features on the CPU."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    features = [model.features(chunk.to(device).float()).float().cpu() for chunk in images.split(batch_size)]
    model.train(was_training)
    return torch.cat(features)


def classifier_accuracy(model: ImageClassifier, images, labels, batch_size: int = 256) -> float:
    """Fraction of `images` whose arg-max class equals `labels`."""
    predictions = classifier_logits(model, as_image_tensor(images), batch_size).argmax(dim=-1)
    return prediction_accuracy(predictions, labels)


def prediction_accuracy(predictions: torch.Tensor, labels) -> float:
    """Fraction of `predictions` (class indices, on the CPU) equal to `labels`."""
    return (predictions == as_label_tensor(labels)).double().mean().item()


def accuracy_by_class(predictions: torch.Tensor, labels) -> dict[str, float]:
    """{class index: fraction of that class's items predicted as it}, for the classes present in `labels`."""
    labels = as_label_tensor(labels).to(predictions.device)
    return {str(value): (predictions[labels == value] == value).double().mean().item()
            for value in labels.unique().tolist()}


def train_classifier(train_images, train_labels, config: ClassifierConfig, num_classes: int, *,
                     val_images=None, val_labels=None, device="cpu",
                     progress: bool = True) -> tuple[ImageClassifier, dict[str, float]]:
    """Train with Adam and a cosine learning-rate decay; returns the model (eval mode) and metrics."""
    images = as_image_tensor(train_images).cpu()      # batches move to `device` one at a time
    labels = as_label_tensor(train_labels)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    generator = torch.Generator().manual_seed(config.seed)
    model = ImageClassifier(config, num_classes, images.shape[1], tuple(images.shape[2:]))
    _initialize(model, generator)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    steps_per_epoch = math.ceil(len(images) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    # A short schedule: decaying the rate to zero buys most of the last percent of accuracy.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))
    started = time.perf_counter()
    model.train()
    correct, seen, loss_sum = 0, 0, 0.0
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        correct, seen, loss_sum = 0, 0, 0.0
        for batch_indices in order.split(config.batch_size):
            batch = images[batch_indices]
            if config.augment and config.max_shift > 0:
                batch = _random_shift(batch, config.max_shift, generator)
            batch, batch_labels = batch.to(device), labels[batch_indices].to(device)
            logits = model(batch)
            loss = F.cross_entropy(logits, batch_labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(batch_indices)
            correct += (logits.argmax(dim=-1) == batch_labels).sum().item()
            seen += len(batch_indices)
        if progress:
            logger.info("classifier epoch %d/%d: loss %.4f, train accuracy %.4f",
                        epoch + 1, config.epochs, loss_sum / seen, correct / seen)
    model.eval()
    metrics = {
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "train_seconds": time.perf_counter() - started,
        "train_size": float(len(images)),
    }
    if val_images is not None and val_labels is not None:
        metrics["val_accuracy"] = classifier_accuracy(model, val_images, val_labels)
        if progress:
            logger.info("classifier validation accuracy %.4f", metrics["val_accuracy"])
    return model, metrics


def _describe(model: ImageClassifier) -> dict:
    return {"kind": KIND, "config": dataclasses.asdict(model.config), "num_classes": model.num_classes,
            "in_channels": model.in_channels, "image_size": list(model.image_size)}


def save_classifier(model: ImageClassifier, directory, extra: dict | None = None) -> None:
    """Write config.json (architecture + `extra` records) and model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = {**_describe(model), **(extra or {})}
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME))
    (directory / CONFIG_NAME).write_text(json.dumps(record, indent=2, sort_keys=True))


def load_classifier(directory, device="cpu") -> ImageClassifier:
    """Rebuild from config.json and load the safetensors weights strictly; returned in eval mode."""
    directory = Path(directory)
    record = json.loads((directory / CONFIG_NAME).read_text())
    if record.get("kind") != KIND:
        raise ValueError(f"{directory} holds kind {record.get('kind')!r}, not {KIND!r}")
    model = ImageClassifier(ClassifierConfig.from_dict(record["config"]), int(record["num_classes"]),
                            int(record["in_channels"]), tuple(record["image_size"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)), strict=True)
    return model.to(device).eval()


def _normalised(value) -> object:
    # JSON round trip: tuples become lists and dict keys strings, as they will be when read back.
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _data_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.detach().cpu().contiguous().numpy())     # buffer protocol: no extra copy
    digest.update(labels.detach().cpu().contiguous().numpy())
    return digest.hexdigest()


def load_or_train_classifier(cache_dir, train_images, train_labels, config: ClassifierConfig, num_classes: int, *,
                             fingerprint: dict | None = None, val_images=None, val_labels=None, device="cpu",
                             progress: bool = True) -> tuple[ImageClassifier, dict]:
    """Reuse the classifier in `cache_dir` if its recorded fingerprint matches, else train and save it.

    The recorded fingerprint is the caller's dict plus the classifier config, the number of classes
    and a sha256 of the training images and labels, so a stale cache is never silently reused.
    Returns (model, info): the training metrics (as recorded when it was trained) plus `reused`.
    """
    cache_dir = Path(cache_dir)
    images = as_image_tensor(train_images)
    labels = as_label_tensor(train_labels)
    full_fingerprint = _normalised({
        "caller": fingerprint or {},
        "config": dataclasses.asdict(config),
        "num_classes": num_classes,
        "train_data_sha256": _data_digest(images, labels),
    })
    config_path = cache_dir / CONFIG_NAME
    if config_path.is_file() and (cache_dir / WEIGHTS_NAME).is_file():
        record = json.loads(config_path.read_text())
        if record.get("fingerprint") == full_fingerprint:
            logger.info("reusing cached classifier from %s", cache_dir)
            model = load_classifier(cache_dir, device=device)
            return model, {**record.get("metrics", {}), "reused": True}
        logger.info("cached classifier in %s has a different fingerprint; retraining", cache_dir)
    model, metrics = train_classifier(images, labels, config, num_classes, val_images=val_images,
                                      val_labels=val_labels, device=device, progress=progress)
    save_classifier(model, cache_dir, extra={"fingerprint": full_fingerprint, "metrics": metrics})
    return model, {**metrics, "reused": False}
