"""Data sources: the bundled MNIST subset, npz files, image folders, the HF path, and their errors."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import data as data_module
from pipelines.data import (
    DataConfig,
    DataError,
    ImageSplit,
    ImageTensorDataset,
    load_image_dataset,
    to_tensor_images,
    to_uint8_images,
)


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """Keep the imagefolder builder's Arrow cache inside the test's own folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def class_counts(split: ImageSplit, num_classes: int) -> list[int]:
    return np.bincount(split.labels, minlength=num_classes).tolist()


def write_png(path, size=(8, 8), value=0, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = () if mode == "L" else (3,)
    Image.fromarray(np.full((size[1], size[0], *channels), value, dtype=np.uint8), mode=mode).save(path)


# --- config ---------------------------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sorce'\] in \[data\]; valid keys:.*source"):
        DataConfig.from_dict({"sorce": "npz"})
    assert DataConfig.from_dict({"source": "npz", "path": "x.npz"}).path == "x.npz"
    with pytest.raises(ValueError, match="data.source must be one of"):
        DataConfig(source="csv", path="x")
    with pytest.raises(ValueError, match="needs data.path"):
        DataConfig(source="npz")


# --- bundled --------------------------------------------------------------------------------------


def test_bundled_mnist_subset_is_real_balanced_and_split():
    dataset = load_image_dataset(DataConfig())
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (9000, 1000, 2000)
    assert dataset.train.images.shape[1:] == (28, 28, 1) and dataset.train.images.dtype == np.uint8
    assert dataset.train.labels.dtype == np.int64
    assert (dataset.num_classes, dataset.class_names, dataset.channels) == (10, [str(d) for d in range(10)], 1)
    assert dataset.image_size == (28, 28)
    assert class_counts(dataset.train, 10) == [900] * 10
    assert class_counts(dataset.val, 10) == [100] * 10
    assert class_counts(dataset.test, 10) == [200] * 10
    # MNIST statistics: black background, white ink, mean intensity near 0.13.
    assert dataset.train.images.min() == 0 and dataset.train.images.max() == 255
    assert 0.11 < dataset.train.images.mean() / 255 < 0.15
    assert dataset.source["source"] == "bundled" and "MNIST" in dataset.source["origin"]


def test_bundled_subsets_resize_and_channels_are_seeded():
    config = DataConfig(max_train=100, max_test=50, image_size=16, channels=3, seed=3)
    dataset = load_image_dataset(config)
    assert dataset.train.images.shape == (90, 16, 16, 3) and len(dataset.val) == 10
    assert class_counts(dataset.train, 10) == [9] * 10 and class_counts(dataset.test, 10) == [5] * 10
    # Grayscale -> RGB repeats the grey level.
    assert (dataset.train.images[..., 0] == dataset.train.images[..., 2]).all()
    again = load_image_dataset(config)
    assert np.array_equal(dataset.train.images, again.train.images)
    other = load_image_dataset(DataConfig(max_train=100, max_test=50, image_size=16, channels=3, seed=4))
    assert not np.array_equal(dataset.train.images, other.train.images)


# --- npz ------------------------------------------------------------------------------------------


def test_npz_float_images_with_own_validation_split(tmp_path):
    generator = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=generator.random((20, 6, 5, 3)), y_train=np.arange(20) % 4,
             x_valid=generator.random((8, 6, 5, 3)), y_valid=np.arange(8) % 4,
             x_test=generator.random((12, 6, 5, 3)), y_test=np.arange(12) % 4)
    dataset = load_image_dataset(DataConfig(source="npz", path=str(path)))
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (20, 8, 12)
    assert dataset.train.images.shape == (20, 6, 5, 3) and dataset.train.images.dtype == np.uint8
    assert (dataset.num_classes, dataset.channels, dataset.image_size) == (4, 3, (6, 5))
    gray = load_image_dataset(DataConfig(source="npz", path=str(path), channels=1))
    assert gray.train.images.shape == (20, 6, 5, 1)


def test_npz_binarized_flat_layout_without_labels(tmp_path):
    path = tmp_path / "binary.npz"
    generator = np.random.default_rng(1)
    np.savez(path, x_train=generator.integers(0, 2, (30, 64), dtype=np.uint8),
             x_test=generator.integers(0, 2, (10, 64), dtype=np.uint8))
    dataset = load_image_dataset(DataConfig(source="npz", path=str(path), val_fraction=0.2))
    assert dataset.train.images.shape == (24, 8, 8, 1) and len(dataset.val) == 6
    assert set(np.unique(dataset.test.images)) <= {0, 255}
    assert dataset.num_classes == 0 and dataset.train.labels is None and dataset.class_names == []


def test_npz_errors_name_the_problem(tmp_path):
    missing = tmp_path / "nowhere.npz"
    with pytest.raises(DataError, match="nowhere.npz does not exist"):
        load_image_dataset(DataConfig(source="npz", path=str(missing)))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="corrupt.npz"):
        load_image_dataset(DataConfig(source="npz", path=str(corrupt)))
    wrong_shape = tmp_path / "wrong.npz"
    np.savez(wrong_shape, x_train=np.zeros((4, 3, 3, 3, 3), np.uint8), x_test=np.zeros((2, 3, 3), np.uint8))
    expected = r"expected x_train of shape \(n, h, w\) or \(n, h, w, c\) uint8.*got uint8 of shape"
    with pytest.raises(DataError, match=expected):
        load_image_dataset(DataConfig(source="npz", path=str(wrong_shape)))
    wrong_dtype = tmp_path / "int32.npz"
    np.savez(wrong_dtype, x_train=np.zeros((4, 3, 3), np.int32), x_test=np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(DataError, match="got int32"):
        load_image_dataset(DataConfig(source="npz", path=str(wrong_dtype)))
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, x_train=np.zeros((4, 3, 3), np.uint8), y_train=np.zeros(5, np.int64),
             x_test=np.zeros((2, 3, 3), np.uint8), y_test=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="y_train has 5 labels but there are 4 images"):
        load_image_dataset(DataConfig(source="npz", path=str(mismatch)))
    no_test = tmp_path / "no_test.npz"
    np.savez(no_test, x_train=np.zeros((4, 3, 3), np.uint8))
    with pytest.raises(DataError, match=r"missing array\(s\) \['x_test'\]"):
        load_image_dataset(DataConfig(source="npz", path=str(no_test)))


# --- image folders --------------------------------------------------------------------------------


def test_imagefolder_with_train_test_and_classes(tmp_path):
    root = tmp_path / "pets"
    for split, count in (("train", 5), ("test", 2)):
        for class_index, name in enumerate(("cat", "dog")):
            for index in range(count):
                write_png(root / split / name / f"{index}.png", value=100 * class_index + index)
    dataset = load_image_dataset(DataConfig(source="imagefolder", path=str(root), val_fraction=0.2))
    assert dataset.class_names == ["cat", "dog"] and dataset.num_classes == 2
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (8, 2, 4)
    assert dataset.train.images.shape[1:] == (8, 8, 1)
    # Pixel values tell which class folder an image came from: labels must agree with them.
    assert ((dataset.train.images[:, 0, 0, 0] >= 100) == (dataset.train.labels == 1)).all()
    assert class_counts(dataset.test, 2) == [2, 2]


def test_imagefolder_mixed_sizes_need_image_size_and_corrupt_file_is_named(tmp_path):
    root = tmp_path / "shapes"
    write_png(root / "a" / "small.png", size=(8, 8))
    write_png(root / "a" / "wide.png", size=(12, 8), mode="RGB")
    write_png(root / "b" / "one.png", size=(8, 8))
    write_png(root / "b" / "two.png", size=(8, 8))
    config = DataConfig(source="imagefolder", path=str(root), val_fraction=0.0, test_fraction=0.5)
    with pytest.raises(DataError, match="different sizes.*set data.image_size"):
        load_image_dataset(config)
    resized = load_image_dataset(DataConfig(source="imagefolder", path=str(root), image_size=6,
                                            val_fraction=0.0, test_fraction=0.5))
    # One RGB file makes the native format RGB.
    assert resized.train.images.shape[1:] == (6, 6, 3) and len(resized.train) + len(resized.test) == 4
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"cannot read image .*b/broken\.png"):
        load_image_dataset(DataConfig(source="imagefolder", path=str(root), image_size=6))


def test_imagefolder_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError, match="absent.*does not exist"):
        load_image_dataset(DataConfig(source="imagefolder", path=str(tmp_path / "absent")))
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    (empty / "class_a" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty holds no image files"):
        load_image_dataset(DataConfig(source="imagefolder", path=str(empty)))


# --- Hugging Face Hub -----------------------------------------------------------------------------


def test_hf_offline_failure_names_dataset_and_suggests_local_source(monkeypatch):
    def offline(name, *args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="'someone/digits'.*offline.*'npz'.*'imagefolder'"):
        load_image_dataset(DataConfig(source="hf", path="someone/digits"))


def test_hf_dataset_dict_is_converted(monkeypatch):
    features = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=["zero", "one", "two"])})

    def split(count):
        images = [Image.fromarray(np.full((5, 5), 20 * index, np.uint8)) for index in range(count)]
        return datasets.Dataset.from_dict({"img": images, "digit": [index % 3 for index in range(count)]}, features)

    hub = datasets.DatasetDict(train=split(9), validation=split(3), test=split(6))
    monkeypatch.setattr(datasets, "load_dataset", lambda name: hub)
    config = DataConfig(source="hf", path="someone/digits", hf_image_column="img", hf_label_column="digit")
    dataset = load_image_dataset(config)
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (9, 3, 6)
    assert dataset.class_names == ["zero", "one", "two"] and dataset.train.images.shape == (9, 5, 5, 1)
    assert dataset.train.labels.tolist() == [0, 1, 2] * 3
    with pytest.raises(DataError, match="no image column 'image'.*hf_image_column"):
        load_image_dataset(DataConfig(source="hf", path="someone/digits"))


# --- tensors --------------------------------------------------------------------------------------


def test_tensor_conversion_round_trip_and_clamp():
    images = np.random.default_rng(2).integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    tensor = to_tensor_images(images)
    assert tensor.shape == (3, 3, 4, 5) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert np.array_equal(to_uint8_images(tensor), images)
    assert to_uint8_images(torch.full((1, 1, 2, 2), 5.0)).max() == 255
    assert to_uint8_images(torch.full((1, 1, 2, 2), -5.0)).max() == 0


def test_image_tensor_dataset_items():
    images = np.zeros((4, 6, 6, 1), np.uint8)
    labelled = ImageTensorDataset(ImageSplit(images, np.arange(4, dtype=np.int64)))
    item = labelled[2]
    assert item["pixel_values"].shape == (1, 6, 6) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() == -1 and item["label"].dtype == torch.int64 and item["label"] == 2
    batch = next(iter(torch.utils.data.DataLoader(labelled, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 1, 6, 6) and batch["label"].shape == (4,)
    assert "label" not in ImageTensorDataset(ImageSplit(images, None))[0]


def test_balanced_subset_deals_classes_evenly():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    chosen = data_module.balanced_subset(labels, 9, np.random.default_rng(0))
    assert np.bincount(labels[chosen]).tolist() == [3, 3, 3]
    assert (np.diff(chosen) > 0).all()
