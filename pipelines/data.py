"""Image data sources: every source becomes the same `ImageDataset` of uint8 arrays.

A run names its data with a `DataConfig`: the MNIST subset bundled with tokgen (the default, so
that `tokgen run` works offline out of the box), an `.npz` file of arrays or of concatenated JPEG
files (the layout of `cifar10_jpeg.npz`, CIFAR-10 of Krizhevsky 2009, "Learning Multiple Layers of
Features from Tiny Images", re-encoded as JPEG and so lossy), a local folder with one sub-folder
per class (read through Hugging Face `datasets`' "imagefolder" builder), or any Hugging Face Hub
image data set. Whatever the source, images come out as uint8 `(n h w c)` with
int64 labels, resized and converted to the requested channels with Pillow, split into train, val
and test (val carved from train, seeded and class-stratified, when the source has none) and
optionally cut to class-balanced subsets. Bad input fails early with a `DataError` that names the
file. Tensors for the models are float32 `(n c h w)` in [-1, 1]. The bundled data is MNIST
(LeCun, Bottou, Bengio & Haffner 1998, "Gradient-based learning applied to document recognition").
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import io
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, UnidentifiedImageError

from pipelines.config_tables import build_dataclass

logger = logging.getLogger(__name__)

SOURCES = ("bundled", "npz", "imagefolder", "hf", "cifar10_jpeg")
BUNDLED_FILE = "mnist_small.npz"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Split names used by sources for their validation split, mapped onto tokgen's "val".
VALIDATION_NAMES = ("val", "valid", "validation")
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "F"}


class DataError(ValueError):
    """Data that cannot be loaded: a missing or corrupt file, wrong shapes, an empty data set."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "bundled"  # "bundled" | "npz" | "imagefolder" | "hf" | "cifar10_jpeg"
    path: str = ""  # npz file (arrays or JPEG archive), image folder, or Hugging Face dataset name
    image_size: int = 0  # 0 keeps the native size; otherwise resize to a square of this side
    channels: int = 0  # 0 keeps the native channels; 1 = grayscale, 3 = RGB
    val_fraction: float = 0.1  # carved from train when the source has no validation split
    test_fraction: float = 0.1  # carved from train when the source has no test split
    max_train: int = 0  # 0 = all; otherwise a class-balanced subset (taken before carving val)
    max_test: int = 0  # 0 = all; caps the test split and a source's own val split
    seed: int = 0
    hf_image_column: str = "image"
    hf_label_column: str = "label"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {list(SOURCES)}, got {self.source!r}")
        if self.source != "bundled" and not self.path:
            raise ValueError(f"data.source={self.source!r} needs data.path")
        if self.channels not in (0, 1, 3):
            raise ValueError(f"data.channels must be 0 (native), 1 or 3, got {self.channels}")
        if self.image_size < 0 or self.max_train < 0 or self.max_test < 0:
            raise ValueError("data.image_size, data.max_train and data.max_test must be >= 0")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"data.{name} must be in [0, 1), got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict) -> "DataConfig":
        return build_dataclass(cls, data, "data")


class JpegImages:
    """One split of an npz JPEG archive (`{split}_jpeg` bytes, `{split}_offsets`), decoded when indexed.

    Only `load_image_dataset` sees this: subsets and holdouts index it before anything is decoded,
    so `max_train=500` decodes 500 images, not 50,000, and the dataset it returns holds arrays.
    Indexing with an index array, a slice or a boolean mask gives uint8 (n h w 3).
    """

    def __init__(self, data: np.ndarray, offsets: np.ndarray, split: str, where: str):
        self.data, self.offsets, self.split, self.where = data, offsets, split, where
        if data.ndim != 1 or data.dtype != np.uint8:
            raise DataError(f"{where}: {split}_jpeg must be flat uint8 bytes, got {data.dtype} of shape {data.shape}")
        if (offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer) or len(offsets) < 1
                or offsets[0] != 0 or offsets[-1] != len(data) or (np.diff(offsets) < 0).any()):
            raise DataError(f"{where}: {split}_offsets must be non-decreasing integers from 0 to "
                            f"len({split}_jpeg) = {len(data)}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def decode(self, index: int) -> np.ndarray:
        """Image `index` -> uint8 (h w 3); a file Pillow cannot decode is a DataError naming it."""
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        try:
            with Image.open(io.BytesIO(self.data[start:end].tobytes())) as image:
                return np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
            raise DataError(f"{self.where}: cannot decode JPEG {index} of the {self.split!r} split: {error}") from error

    def __getitem__(self, selection) -> np.ndarray:
        indices = np.arange(len(self))[selection].reshape(-1)
        images = [self.decode(int(index)) for index in indices]
        if not images:  # keep (0 h w 3) so that empty splits have the data's shape
            return np.zeros((0, *self.decode(0).shape) if len(self) else (0, 0, 0, 3), dtype=np.uint8)
        shapes = sorted({image.shape for image in images})
        if len(shapes) > 1:
            raise DataError(f"{self.where}: JPEGs of the {self.split!r} split have different shapes {shapes[:5]}")
        return np.stack(images)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self[:]
        return images if dtype is None else images.astype(dtype)


@dataclass
class ImageSplit:
    images: np.ndarray  # uint8 (n h w c); a JpegImages only inside load_image_dataset
    labels: np.ndarray | None  # int64 (n,), None for unlabelled data

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class ImageDataset:
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    num_classes: int  # 0 when the data has no labels
    class_names: list[str]
    channels: int
    image_size: tuple[int, int]  # (h, w)
    source: dict = field(default_factory=dict)  # JSON-able description, recorded in the token manifest

    def splits(self) -> dict[str, ImageSplit]:
        return {"train": self.train, "val": self.val, "test": self.test}


# --- tensors ------------------------------------------------------------------------------------


def to_tensor_images(images: np.ndarray) -> torch.Tensor:
    """uint8 (n h w c) -> float32 (n c h w) in [-1, 1]."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images (n h w c), got {images.dtype} of shape {images.shape}")
    pixels = rearrange(torch.from_numpy(np.ascontiguousarray(images)), "n h w c -> n c h w")
    return pixels.float() / 127.5 - 1.0


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """float (n c h w) in [-1, 1] (clamped) -> uint8 (n h w c); the inverse of `to_tensor_images`."""
    if images.ndim != 4:
        raise ValueError(f"expected images (n c h w), got shape {tuple(images.shape)}")
    pixels = ((images.detach().float().cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return rearrange(pixels, "n c h w -> n h w c").numpy()


class ImageTensorDataset(torch.utils.data.Dataset):
    """An `ImageSplit` as `{"pixel_values": (c h w) float32 in [-1, 1], "label": int64}` items.

    The whole split is converted once here, so that a training step never touches numpy.
    """

    def __init__(self, split: ImageSplit):
        self.pixel_values = to_tensor_images(split.images)
        self.labels = None if split.labels is None else torch.as_tensor(split.labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.pixel_values)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"pixel_values": self.pixel_values[index]}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item


# --- checking and converting raw images -----------------------------------------------------------


def _as_uint8_images(array: np.ndarray, name: str, where: str) -> np.ndarray:
    """(n h w) / (n h w c) uint8 or float in [0, 1], or flat binarized (n, s*s) -> uint8 (n h w c)."""
    expected = f"expected {name} of shape (n, h, w) or (n, h, w, c) uint8 (or float in [0, 1])"
    if array.ndim == 2 and array.shape[1] > 0 and round(array.shape[1] ** 0.5) ** 2 == array.shape[1]:
        # The flat layout of binarized MNIST: (n, 784) rows of {0, 1}.
        if array.size and np.isin(array, (0, 1)).all():
            side = round(array.shape[1] ** 0.5)
            array = (rearrange(array, "n (h w) -> n h w", h=side) * 255).astype(np.uint8)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise DataError(f"{where}: {expected}, got {array.dtype} of shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0.0 or np.nanmax(array) > 1.0 or np.isnan(array).any()):
            raise DataError(f"{where}: {name} is float but not in [0, 1]; {expected}")
        array = np.round(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise DataError(f"{where}: {expected}, got {array.dtype} of shape {array.shape}")
    return array


def _as_labels(array: np.ndarray | None, count: int, name: str, where: str) -> np.ndarray | None:
    if array is None:
        return None
    if array.ndim != 1 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise DataError(f"{where}: expected {name} of shape (n,) integers, got {array.dtype} of shape {array.shape}")
    if len(array) != count:
        raise DataError(f"{where}: {name} has {len(array)} labels but there are {count} images")
    if array.size and array.min() < 0:
        raise DataError(f"{where}: {name} has negative labels")
    return array.astype(np.int64)


def _convert_array(images: np.ndarray, config: DataConfig) -> np.ndarray:
    """Resize and change channels of uint8 (n h w c) arrays as the config asks."""
    if config.channels == 3 and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    elif config.channels == 1 and images.shape[-1] == 3:
        # ITU-R 601-2 luma, the weights Pillow's convert("L") uses.
        luma = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        images = np.round(luma).clip(0, 255).astype(np.uint8)[..., None]
    if config.image_size and images.shape[1:3] != (config.image_size, config.image_size):
        channels = images.shape[-1]
        images = np.stack([pil_to_array(_array_to_pil(image), channels, config.image_size) for image in images])
    return images


def _array_to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def pil_to_array(image: Image.Image, channels: int, image_size: int | tuple[int, int]) -> np.ndarray:
    """uint8 (h w c) with `channels` channels, resized to `image_size` (a square's side, or (width, height); 0 keeps it)."""
    image = image.convert("L" if channels == 1 else "RGB")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if image_size and image.size != size:
        # Pillow's bicubic filter widens its support when shrinking, so downscaling is antialiased.
        image = image.resize(size, Image.Resampling.BICUBIC)
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def decode_image(item, where: str) -> Image.Image:
    """Decode one image given as a path or `{"bytes", "path"}` dict, naming the file on failure."""
    path = item.get("path") if isinstance(item, dict) else item
    data = item.get("bytes") if isinstance(item, dict) else None
    name = path or where
    try:
        image = Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image {name}: {error}") from error
    return image


def _stack_pil_images(items: list, config: DataConfig, where: str) -> np.ndarray:
    """Decode and convert a list of images of possibly mixed sizes and modes into uint8 (n h w c)."""
    images = [decode_image(item, where) for item in items]
    channels = config.channels or (1 if all(image.mode in GRAYSCALE_MODES for image in images) else 3)
    if not config.image_size:
        sizes = sorted({image.size for image in images})
        if len(sizes) > 1:
            raise DataError(f"{where}: images have different sizes {sizes[:5]} (w, h); "
                            "set data.image_size to resize them")
    return np.stack([pil_to_array(image, channels, config.image_size) for image in images])


# --- sources: each returns ({split name: ImageSplit}, class names, description) -----------------------


def _npz_splits(arrays, where: str, jpeg_only: bool = False) -> dict[str, ImageSplit]:
    """Splits of an npz of image arrays (`x_train`, ...) or of JPEG archives (`train_jpeg`, ...)."""
    keys = set(arrays.files)
    jpeg = "train_jpeg" in keys or jpeg_only
    required = {"train_jpeg", "train_offsets", "test_jpeg", "test_offsets"} if jpeg else {"x_train", "x_test"}
    missing = required - keys
    if missing:
        layouts = "x_train/x_test image arrays, or train_jpeg/train_offsets/test_jpeg/test_offsets JPEG archives"
        raise DataError(f"{where}: missing array(s) {sorted(missing)}; found {sorted(keys)} (expected {layouts})")
    splits = {}
    for split, suffix in (("train", "train"), ("val", "valid"), ("val", "val"), ("test", "test")):
        name = f"{suffix}_jpeg" if jpeg else f"x_{suffix}"
        if name not in keys or split in splits:
            continue
        if jpeg:
            if f"{suffix}_offsets" not in keys:
                raise DataError(f"{where}: {name} has no {suffix}_offsets array")
            images = JpegImages(arrays[name], arrays[f"{suffix}_offsets"], suffix, where)
        else:
            images = _as_uint8_images(arrays[name], name, where)
        labels = arrays[f"y_{suffix}"] if f"y_{suffix}" in keys else None
        splits[split] = ImageSplit(images, _as_labels(labels, len(images), f"y_{suffix}", where))
    if (splits["train"].labels is None) != (splits["test"].labels is None):
        raise DataError(f"{where}: y_train and y_test must both be given or both be absent")
    return splits


def _load_npz(path: Path, where: str, jpeg_only: bool = False) -> tuple[dict[str, ImageSplit], list[str] | None]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    try:
        # Arrays are read into memory here; JPEG archives stay encoded until a split is indexed.
        with np.load(path, allow_pickle=False) as arrays:
            splits = _npz_splits(arrays, where, jpeg_only)
            class_names = [str(name) for name in arrays["class_names"]] if "class_names" in arrays.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read {path} as an npz file of arrays: {error}") from error
    return splits, class_names


def _load_bundled() -> tuple[dict[str, ImageSplit], list[str]]:
    resource = importlib.resources.files("pipelines").joinpath("assets").joinpath(BUNDLED_FILE)
    with importlib.resources.as_file(resource) as path:
        splits, _ = _load_npz(Path(path), f"bundled {BUNDLED_FILE}")
    return splits, [str(digit) for digit in range(10)]


def _from_hf_dataset_dict(dataset_dict, config: DataConfig, where: str) -> tuple[dict[str, ImageSplit], list | None]:
    """Hugging Face `DatasetDict` (image + optional label column) -> decoded splits."""
    import datasets

    splits, class_names = {}, None
    for name, dataset in dataset_dict.items():
        split = "val" if name in VALIDATION_NAMES else name
        if split not in ("train", "val", "test"):
            logger.warning("%s: ignoring split %r (tokgen uses train, val/validation and test)", where, name)
            continue
        if config.hf_image_column not in dataset.column_names:
            raise DataError(f"{where}: no image column {config.hf_image_column!r} in split {name!r}; "
                            f"columns are {dataset.column_names} (set data.hf_image_column)")
        if isinstance(dataset.features[config.hf_image_column], datasets.Image):
            # Undecoded, so that a corrupt file is reported by our own decoder with its path.
            dataset = dataset.cast_column(config.hf_image_column, datasets.Image(decode=False))
        items = dataset[config.hf_image_column]
        items = [item if isinstance(item, dict) else np.asarray(item) for item in items]
        if items and not isinstance(items[0], dict):
            images = _as_uint8_images(np.stack(items), config.hf_image_column, f"{where} split {name!r}")
            images = _convert_array(images, config)
        else:
            images = _stack_pil_images(items, config, f"{where} split {name!r}")
        labels = None
        if config.hf_label_column in dataset.column_names:
            labels = np.asarray(dataset[config.hf_label_column])
            feature = dataset.features[config.hf_label_column]
            if isinstance(feature, datasets.ClassLabel):
                class_names = list(feature.names)
        labels = _as_labels(labels, len(images), config.hf_label_column, f"{where} split {name!r}")
        splits[split] = ImageSplit(images, labels)
    return splits, class_names


def _load_imagefolder(path: Path, config: DataConfig) -> tuple[dict[str, ImageSplit], list[str] | None]:
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist or is not a folder")
    if not any(file.suffix.lower() in IMAGE_EXTENSIONS for file in path.rglob("*") if file.is_file()):
        raise DataError(f"image folder {path} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    import datasets

    try:
        dataset_dict = datasets.load_dataset("imagefolder", data_dir=str(path))
    except Exception as error:  # datasets raises many types here; the user needs the folder and the cause
        raise DataError(f"cannot read image folder {path}: {type(error).__name__}: {error}") from error
    return _from_hf_dataset_dict(dataset_dict, config, f"image folder {path}")


def _load_hf(name: str, config: DataConfig) -> tuple[dict[str, ImageSplit], list[str] | None]:
    import datasets

    try:
        dataset_dict = datasets.load_dataset(name)
    except Exception as error:  # offline, unknown name, gated repo ...: all need the same advice
        raise DataError(
            f"cannot load Hugging Face dataset {name!r}: {type(error).__name__}: {error}. Offline or without "
            f"access, use a local copy: data.source='npz' (arrays) or 'imagefolder' (one folder per class)"
        ) from error
    return _from_hf_dataset_dict(dataset_dict, config, f"Hugging Face dataset {name!r}")


# --- splitting and subsets ----------------------------------------------------------------------


def _class_groups(labels: np.ndarray | None, count: int) -> list[np.ndarray]:
    return [np.arange(count)] if labels is None else [np.flatnonzero(labels == value) for value in np.unique(labels)]


def balanced_subset(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `size` items, as equal per class as the classes allow (random within a class)."""
    groups = [rng.permutation(group) for group in _class_groups(labels, len(labels))]
    # Deal one index per class in turn, so that every class gets floor or ceil of size / classes.
    rounds = max(len(group) for group in groups)
    dealt = [group[turn] for turn in range(rounds) for group in groups if turn < len(group)]
    return np.sort(np.asarray(dealt[:size], dtype=np.int64))


def _subset(split: ImageSplit, size: int, rng: np.random.Generator) -> ImageSplit:
    if not size or size >= len(split):
        return split
    if split.labels is None:
        index = np.sort(rng.permutation(len(split))[:size])
    else:
        index = balanced_subset(split.labels, size, rng)
    return ImageSplit(split.images[index], None if split.labels is None else split.labels[index])


def _holdout(split: ImageSplit, fraction: float, rng: np.random.Generator) -> tuple[ImageSplit, ImageSplit]:
    """Class-stratified random holdout: (rest, held out)."""
    groups = _class_groups(split.labels, len(split))
    held = np.concatenate([rng.permutation(group)[: int(round(fraction * len(group)))] for group in groups])
    mask = np.zeros(len(split), dtype=bool)
    mask[held.astype(np.int64)] = True

    def take(selection: np.ndarray) -> ImageSplit:
        return ImageSplit(split.images[selection], None if split.labels is None else split.labels[selection])

    return take(~mask), take(mask)


def load_image_dataset(config: DataConfig) -> ImageDataset:
    """Load the data a `DataConfig` names, as train/val/test uint8 splits (seeded, deterministic)."""
    class_names = None
    if config.source == "bundled":
        splits, class_names = _load_bundled()
    elif config.source in ("npz", "cifar10_jpeg"):
        splits, class_names = _load_npz(Path(config.path), str(config.path), config.source == "cifar10_jpeg")
    elif config.source == "imagefolder":
        splits, class_names = _load_imagefolder(Path(config.path), config)
    else:
        splits, class_names = _load_hf(config.path, config)
    where = config.path or f"bundled {BUNDLED_FILE}"
    if "train" not in splits or not len(splits["train"]):
        raise DataError(f"{where}: the data set has no training images")

    rng = np.random.default_rng(config.seed)
    train = _subset(splits["train"], config.max_train, rng)
    test = splits.get("test")
    if test is None:
        if not config.test_fraction:
            raise DataError(f"{where}: the data set has no test split; "
                            "set data.test_fraction > 0 to carve one from train")
        train, test = _holdout(train, config.test_fraction, rng)
    val = splits.get("val")
    if val is None:
        train, val = _holdout(train, config.val_fraction, rng)
    test, val = _subset(test, config.max_test, rng), _subset(val, config.max_test, rng)
    if config.source in ("bundled", "npz", "cifar10_jpeg"):
        # Arrays are converted (and JPEGs decoded) after subsetting, so that a small run never
        # decodes or resizes the whole file.
        train, val, test = (ImageSplit(_convert_array(np.asarray(split.images), config), split.labels)
                            for split in (train, val, test))

    named = (("train", train), ("val", val), ("test", test))
    shapes = {name: split.images.shape[1:] for name, split in named if len(split)}
    if len(set(shapes.values())) > 1:
        raise DataError(f"{where}: splits have different image shapes {shapes}; set data.image_size and data.channels")
    labelled = [split.labels is not None for split in (train, val, test) if len(split)]
    if not all(labelled) and any(labelled):
        raise DataError(f"{where}: some splits have labels and others do not")
    if not len(test) or not len(train):
        raise DataError(f"{where}: the {'test' if not len(test) else 'train'} split is empty after splitting")

    num_classes = 0
    if train.labels is not None:
        largest_label = max(int(split.labels.max()) for split in (train, val, test) if len(split))
        if class_names is not None and len(class_names) <= largest_label:
            raise DataError(f"{where}: labels go up to {largest_label} but there are {len(class_names)} class names")
        # Named classes count even when a subset misses one, so that labels keep their meaning.
        class_names = class_names or [str(value) for value in range(largest_label + 1)]
        num_classes = len(class_names)
    height, width, channels = train.images.shape[1:]
    source = {**dataclasses.asdict(config), "origin": _origin(config)}
    logger.info("data %s: train %d, val %d, test %d images of (h w c) = (%d %d %d), %d classes",
                where, len(train), len(val), len(test), height, width, channels, num_classes)
    return ImageDataset(train, val, test, num_classes, list(class_names or []), channels, (height, width), source)


def _origin(config: DataConfig) -> str:
    if config.source == "bundled":
        return f"MNIST subset bundled with tokgen (pipelines/assets/{BUNDLED_FILE}, CC BY-SA 3.0)"
    if config.source == "cifar10_jpeg":
        return ("CIFAR-10 (Krizhevsky 2009) as JPEG quality-75 re-encodings: lossy, so its figures are not "
                "comparable with those of lossless CIFAR-10")
    return {"npz": "npz file", "imagefolder": "local image folder", "hf": "Hugging Face Hub dataset"}[config.source]
