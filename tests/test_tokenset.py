"""Token export format: round trip, Parquet copy, manifest, and refusal of mismatched tokens."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors.torch import save_file
from torch import nn

from pipelines import tokenset as tokenset_module
from pipelines.data import ImageDataset, ImageSplit, to_tensor_images
from pipelines.tokenset import (
    Manifest,
    TokenSetError,
    TokenSetMismatchError,
    TokenTensorDataset,
    export_tokens,
    load_tokenset,
    read_manifest,
    sha256_file,
)


@dataclass(frozen=True)
class PoolConfig:
    kind: ClassVar[str] = "pool"
    levels: int = 5
    patch: int = 2
    num_codebooks: int = 1


class PoolTokenizer(nn.Module):
    """Stand-in tokenizer: average-pool patches and quantize the grey level to a few tokens."""

    def __init__(self, config: PoolConfig, offset: float = 0.0):
        super().__init__()
        self.config = config
        self.offset = nn.Parameter(torch.tensor([offset]))

    @property
    def vocab_size(self) -> int:
        return self.config.levels

    @property
    def num_codebooks(self) -> int:
        return self.config.num_codebooks

    def token_grid(self, input_shape):
        _, height, width = input_shape
        return height // self.config.patch, width // self.config.patch

    def encode(self, x):
        pooled = F.avg_pool2d(x.mean(dim=1, keepdim=True), self.config.patch)[:, 0]  # (b h' w') in [-1, 1]
        tokens = ((pooled + 1) / 2 * self.config.levels).floor().clamp(0, self.config.levels - 1).long()
        if self.config.num_codebooks > 1:
            # A second "level" that is just the flipped token, to check the (h w q) flattening.
            tokens = torch.stack([tokens, self.config.levels - 1 - tokens], dim=-1)
        return tokens

    def save_pretrained(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"offset": self.offset.detach().clone()}, directory / "model.safetensors")


def tiny_dataset(labelled: bool = True, seed: int = 0) -> ImageDataset:
    generator = np.random.default_rng(seed)

    def split(count):
        images = generator.integers(0, 256, (count, 6, 4, 1), dtype=np.uint8)
        return ImageSplit(images, generator.integers(0, 3, count).astype(np.int64) if labelled else None)

    num_classes = 3 if labelled else 0
    return ImageDataset(split(10), split(3), split(5), num_classes, ["a", "b", "c"][:num_classes], 1, (6, 4),
                        {"source": "test", "seed": seed})


@pytest.fixture
def exported(tmp_path):
    tokenizer = PoolTokenizer(PoolConfig())
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    dataset = tiny_dataset()
    manifest = export_tokens(tokenizer, tmp_path / "tokenizer", dataset, tmp_path / "tokens",
                             batch_size=4, progress=False)
    return tokenizer, dataset, manifest, tmp_path


def expected_tokens(tokenizer, images):
    return rearrange(tokenizer.encode(to_tensor_images(images)), "b h w ... -> b (h w ...)")


def test_export_round_trip_keeps_tokens_labels_and_manifest(exported):
    tokenizer, dataset, manifest, root = exported
    tokenset = load_tokenset(root / "tokens", tokenizer_dir=root / "tokenizer",
                             expected_vocab_size=5, expected_sequence_length=6, expected_num_classes=3)
    assert tokenset.manifest == manifest == read_manifest(root / "tokens")
    assert (manifest.token_grid, manifest.sequence_length, manifest.vocab_size) == ([3, 2], 6, 5)
    assert (manifest.order, manifest.num_codebooks, manifest.image_shape) == ("row-major", 1, [1, 6, 4])
    assert manifest.split_sizes == {"train": 10, "val": 3, "test": 5}
    assert manifest.tokenizer_kind == "pool"
    assert manifest.tokenizer_config == {"levels": 5, "patch": 2, "num_codebooks": 1}
    assert manifest.tokenizer_sha256 == sha256_file(root / "tokenizer" / "model.safetensors")
    assert manifest.class_names == ["a", "b", "c"] and manifest.data_source == {"source": "test", "seed": 0}
    for name, split in dataset.splits().items():
        tensors = tokenset.tensors(name)
        assert tensors["input_ids"].dtype == torch.int64
        assert torch.equal(tensors["input_ids"], expected_tokens(tokenizer, split.images))
        assert tensors["label"].tolist() == split.labels.tolist()
        table = pq.read_table(root / "tokens" / f"{name}.parquet")
        assert table.column("input_ids").to_pylist() == tensors["input_ids"].tolist()
        assert table.column("label").to_pylist() == split.labels.tolist()
    # Row-major: token (i, j) of the grid is input_ids[i * w' + j].
    grid = tokenizer.encode(to_tensor_images(dataset.test.images[:1]))[0]
    assert tokenset.tensors("test")["input_ids"][0, 1 * 2 + 1] == grid[1, 1]
    assert json.loads((root / "tokens" / "manifest.json").read_text()) == manifest.to_json()


def test_token_column_split_into_arrow_chunks_keeps_every_row(exported, monkeypatch):
    # Large exports build the token column in chunks (int32 offsets); 7 tokens a chunk forces one row each.
    tokenizer, dataset, _, root = exported
    monkeypatch.setattr(tokenset_module, "LIST_CHUNK_TOKENS", 7)
    export_tokens(tokenizer, root / "tokenizer", dataset, root / "chunked", batch_size=4, progress=False)
    chunked = load_tokenset(root / "chunked")
    rows = np.arange(30).reshape(10, 3)
    in_memory = tokenset_module._token_dataset(rows, None, sequence_length=3)
    assert in_memory.data.table.column("input_ids").num_chunks == 5  # 2 rows of 3 per 7-token chunk
    assert in_memory["input_ids"] == rows.tolist()
    for name, split in dataset.splits().items():
        assert torch.equal(chunked.tensors(name)["input_ids"], expected_tokens(tokenizer, split.images))
        assert (pq.read_table(root / "chunked" / f"{name}.parquet")
                == pq.read_table(root / "tokens" / f"{name}.parquet"))


def test_token_dataset_batches_for_the_prior(exported):
    _, dataset, _, root = exported
    tokenset = load_tokenset(root / "tokens")
    loader = torch.utils.data.DataLoader(TokenTensorDataset(tokenset.splits["train"]), batch_size=4)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 6) and batch["input_ids"].dtype == torch.int64
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.int64
    assert batch["label"].tolist() == dataset.train.labels[:4].tolist()
    row = tokenset.splits["train"][0]
    assert isinstance(row["input_ids"], torch.Tensor) and row["input_ids"].shape == (6,)


def test_unlabelled_and_multi_codebook_export(tmp_path):
    tokenizer = PoolTokenizer(PoolConfig(levels=3, num_codebooks=2))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    dataset = tiny_dataset(labelled=False)
    manifest = export_tokens(tokenizer, tmp_path / "tokenizer", dataset, tmp_path / "tokens", progress=False)
    assert (manifest.num_codebooks, manifest.sequence_length, manifest.num_classes) == (2, 12, 0)
    tokenset = load_tokenset(tmp_path / "tokens")
    assert tokenset.splits["train"].column_names == ["input_ids"]
    item = TokenTensorDataset(tokenset.splits["val"])[0]
    assert set(item) == {"input_ids"}
    tokens = tokenset.tensors("val")["input_ids"]
    # Codebook index fastest: pairs (t, levels - 1 - t) sit next to each other.
    assert torch.equal(tokens[:, 0::2] + tokens[:, 1::2], torch.full((3, 6), 2))
    assert torch.equal(tokens, expected_tokens(tokenizer, dataset.val.images))


def test_other_tokenizer_weights_are_refused(exported):
    _, _, manifest, root = exported
    PoolTokenizer(PoolConfig(), offset=1.0).save_pretrained(root / "other_tokenizer")
    with pytest.raises(TokenSetMismatchError) as raised:
        load_tokenset(root / "tokens", tokenizer_dir=root / "other_tokenizer")
    message = str(raised.value)
    assert manifest.tokenizer_sha256 in message and "'pool'" in message and "other_tokenizer" in message
    assert sha256_file(root / "other_tokenizer" / "model.safetensors") in message and "re-export" in message


@pytest.mark.parametrize(
    "expectation, message",
    [({"expected_vocab_size": 512}, "vocab_size=5 \\(expected 512\\)"),
     ({"expected_sequence_length": 49}, "sequence_length=6 \\(expected 49\\)"),
     ({"expected_num_classes": 0}, "num_classes=3 \\(expected 0\\)")],
)
def test_prior_expectations_must_match(exported, expectation, message):
    with pytest.raises(TokenSetMismatchError, match=message):
        load_tokenset(exported[3] / "tokens", **expectation)


def edit_manifest(root, **changes):
    path = root / "tokens" / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return data


def test_corrupt_or_inconsistent_manifest_is_refused(exported):
    root = exported[3]
    path = root / "tokens" / "manifest.json"
    original = path.read_text()
    path.write_text(original[:40])
    with pytest.raises(TokenSetError, match="manifest.json is not valid JSON"):
        load_tokenset(root / "tokens")
    path.write_text(original)
    edit_manifest(root, colour="blue")
    with pytest.raises(TokenSetError, match=r"unknown key\(s\) \['colour'\]"):
        load_tokenset(root / "tokens")
    data = json.loads(original)
    del data["vocab_size"]
    path.write_text(json.dumps(data))
    with pytest.raises(TokenSetError, match=r"lacks key\(s\) \['vocab_size'\]"):
        load_tokenset(root / "tokens")
    path.write_text(original)
    edit_manifest(root, sequence_length=7)
    with pytest.raises(TokenSetError, match="sequence_length 7 != grid"):
        load_tokenset(root / "tokens")
    path.write_text(original)
    edit_manifest(root, split_sizes={"train": 11, "val": 3, "test": 5})
    with pytest.raises(TokenSetError, match="train has 10 rows, the manifest says 11"):
        load_tokenset(root / "tokens")
    path.write_text(original)
    edit_manifest(root, vocab_size=2)
    with pytest.raises(TokenSetError, match="no pad token"):  # vocab_size no longer equals the codebook
        load_tokenset(root / "tokens")
    edit_manifest(root, vocab_size=2, codebook_size=2)
    with pytest.raises(TokenSetError, match=r"outside \[0, 2\)"):
        load_tokenset(root / "tokens")
    path.unlink()
    with pytest.raises(TokenSetError, match="manifest.json does not exist"):
        load_tokenset(root / "tokens")


def test_missing_split_and_missing_weights_are_named(exported, tmp_path):
    tokenizer, dataset, _, root = exported
    with pytest.raises(TokenSetError, match="does not exist; export needs the saved tokenizer"):
        export_tokens(tokenizer, tmp_path / "nowhere", dataset, tmp_path / "tokens2", progress=False)
    (root / "tokens" / "val" / "dataset_info.json").unlink()
    with pytest.raises(TokenSetError, match="cannot load split 'val'"):
        load_tokenset(root / "tokens")


def test_an_empty_split_is_refused_before_any_encoding(exported, tmp_path):
    tokenizer, dataset, _, root = exported
    dataset = dataclasses.replace(dataset, val=ImageSplit(dataset.val.images[:0], dataset.val.labels[:0]))
    with pytest.raises(TokenSetError, match="val split.*val_fraction"):
        export_tokens(tokenizer, root / "tokenizer", dataset, tmp_path / "empty", progress=False)
    assert not (tmp_path / "empty").exists()


def test_manifest_json_round_trip():
    manifest = Manifest(1, "pool", {"sizes": (1, 2)}, "0" * 64, 16, [2, 2], 4, "row-major", 1, 2, ["x", "y"],
                        {"source": "bundled"}, {"train": 1, "val": 0, "test": 1}, [1, 4, 4])
    data = manifest.to_json()
    assert data["tokenizer_config"] == {"sizes": [1, 2]}
    assert Manifest.from_json(json.loads(json.dumps(data))).to_json() == data
    with pytest.raises(TokenSetError, match="wrong type"):
        Manifest.from_json({**data, "vocab_size": "16"})
    with pytest.raises(TokenSetError, match="format_version"):
        Manifest.from_json({**data, "format_version": 99})
