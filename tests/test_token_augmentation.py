"""Shifted copies of train clips as token augmentation for an audio prior (`audio.train_shifted_copies`)."""

import json

import numpy as np
import pytest
import torch
from einops import rearrange

from pipelines.audio_data import AudioDataset, AudioSplit
from pipelines.config import AudioConfig
from pipelines.tokenset import TokenSetError, export_audio_tokens, iter_shifted_copies, load_tokenset
from tokenizers_vq.audio import AudioVQVAE, AudioVQVAEConfig
from tokenizers_vq.quantizers import ResidualVQConfig, VQConfig


def clips(n: int, length: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n 1 length) random clips, each zero after its own length (as `AudioSplit` keeps them)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length + 1, size=n)
    waveforms = rng.uniform(-0.5, 0.5, size=(n, 1, length)).astype(np.float32)
    for row, real in enumerate(lengths):
        waveforms[row, :, real:] = 0.0
    return waveforms, lengths.astype(np.int64)


def shifted_copies(waveforms, lengths, copies, max_shift, seed) -> tuple[np.ndarray, np.ndarray]:
    """Every copy of `iter_shifted_copies` at once: (copies * n, c, t), clip after clip within each copy."""
    parts = list(iter_shifted_copies(waveforms, lengths, copies, max_shift, seed))
    return np.concatenate([part[0] for part in parts]), np.concatenate([part[1] for part in parts])


def test_each_copy_is_its_clip_delayed_and_cut_at_the_window():
    waveforms, lengths = clips(5)
    copies, copy_lengths = shifted_copies(waveforms, lengths, copies=3, max_shift=40, seed=0)
    assert copies.shape == (15, 1, 160) and copy_lengths.shape == (15,)
    for row in range(15):
        source = waveforms[row % 5, 0]
        shift = int(np.flatnonzero(copies[row, 0])[0] - np.flatnonzero(source)[0])
        assert 1 <= shift <= 40
        assert np.all(copies[row, 0, :shift] == 0)
        np.testing.assert_array_equal(copies[row, 0, shift:], source[: 160 - shift])
        assert copy_lengths[row] == min(lengths[row % 5] + shift, 160)
    again, _ = shifted_copies(waveforms, lengths, copies=3, max_shift=40, seed=0)
    np.testing.assert_array_equal(copies, again)  # seeded: a rerun exports the same tokens
    other, _ = shifted_copies(waveforms, lengths, copies=3, max_shift=40, seed=1)
    assert not np.array_equal(copies, other)


def test_bad_copy_settings_are_refused():
    waveforms, lengths = clips(2)
    with pytest.raises(ValueError, match="positive"):
        shifted_copies(waveforms, lengths, copies=0, max_shift=10, seed=0)
    with pytest.raises(ValueError, match="max_shift_seconds"):
        AudioConfig(train_shifted_copies=2, max_shift_seconds=0.0)
    with pytest.raises(ValueError, match="train_shifted_copies"):
        AudioConfig(train_shifted_copies=-1)


def tiny_dataset() -> AudioDataset:
    def split(n, seed):
        waveforms, lengths = clips(n, seed=seed)
        return AudioSplit(waveforms, lengths, np.arange(n, dtype=np.int64) % 2)

    return AudioDataset(train=split(6, 0), val=split(2, 1), test=split(3, 2), num_classes=2,
                        class_names=["a", "b"], sample_rate=8000, channels=1, source={"kind": "test"})


@pytest.fixture
def tokenizer_dir(tmp_path):
    torch.manual_seed(0)
    codebook = VQConfig(codebook_size=16, kmeans_init=True)
    config = AudioVQVAEConfig(hidden_channels=4, strides=(2, 4), embedding_dim=8,
                              quantizer=ResidualVQConfig(num_quantizers=2, quantizer=codebook))
    tokenizer = AudioVQVAE(config).train()
    tokenizer(torch.from_numpy(clips(8, seed=9)[0]))  # k-means on real latents: clips get distinct codes
    tokenizer.eval()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "tokenizer", tokenizer


def test_export_adds_copies_to_train_only_and_records_them(tmp_path, tokenizer_dir):
    directory, tokenizer = tokenizer_dir
    data = tiny_dataset()
    export_audio_tokens(tokenizer, directory, data, tmp_path / "plain", progress=False)
    plain = load_tokenset(tmp_path / "plain", tokenizer_dir=directory)
    export_audio_tokens(tokenizer, directory, data, tmp_path / "augmented", progress=False,
                        train_shifted_copies=2, max_shift_samples=24, seed=3)
    augmented = load_tokenset(tmp_path / "augmented", tokenizer_dir=directory)
    manifest = augmented.manifest
    assert manifest.split_sizes == {"train": 18, "val": 2, "test": 3}
    assert (manifest.train_shifted_copies, manifest.max_shift_samples) == (2, 24)
    train, original = augmented.tensors("train"), plain.tensors("train")
    # The originals come first, unchanged; the copies carry their clip's label and a longer length.
    torch.testing.assert_close(train["input_ids"][:6], original["input_ids"])
    torch.testing.assert_close(train["label"], original["label"].repeat(3))
    assert torch.all(train["num_samples"][6:] > original["num_samples"].repeat(2))
    delayed, _ = shifted_copies(data.train.waveforms, data.train.lengths, copies=2, max_shift=24, seed=3)
    with torch.no_grad():  # the copies' rows are the tokens of the delayed clips, in order
        codes = tokenizer.encode(torch.from_numpy(delayed))
    torch.testing.assert_close(train["input_ids"][6:], rearrange(codes, "n f q -> n (f q)").long())
    assert not torch.equal(train["input_ids"][6:12], original["input_ids"])  # new sequences, not duplicates
    for split in ("val", "test"):
        torch.testing.assert_close(augmented.tensors(split)["input_ids"], plain.tensors(split)["input_ids"])
    assert plain.manifest.train_shifted_copies == 0


def test_manifest_with_copies_but_no_shift_is_refused(tmp_path, tokenizer_dir):
    directory, tokenizer = tokenizer_dir
    export_audio_tokens(tokenizer, directory, tiny_dataset(), tmp_path / "tokens", progress=False,
                        train_shifted_copies=1, max_shift_samples=8)
    path = tmp_path / "tokens" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(dict(manifest, max_shift_samples=0)))
    with pytest.raises(TokenSetError, match="max_shift_samples"):
        load_tokenset(tmp_path / "tokens")


def test_an_empty_split_is_refused_before_any_encoding(tmp_path, tokenizer_dir):
    directory, tokenizer = tokenizer_dir
    data = tiny_dataset()
    data.val = data.val.take(np.arange(0))  # as a val_fraction too small for the classes leaves it
    with pytest.raises(TokenSetError, match="val split.*val_fraction"):
        export_audio_tokens(tokenizer, directory, data, tmp_path / "tokens", progress=False)
    assert not (tmp_path / "tokens").exists()
