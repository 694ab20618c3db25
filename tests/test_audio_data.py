"""Audio data: FSDD's official split, audio folders (classes, resampling, bad files), masks, resampler."""

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from pipelines.audio_data import (
    AudioDataConfig,
    AudioTensorDataset,
    lengths_to_mask,
    load_audio_dataset,
    read_audio_file,
    resample,
)
from pipelines.data import DataError

FSDD = Path("/work/shared/data/fsdd.npz")
needs_fsdd = pytest.mark.skipif(not FSDD.is_file(), reason=f"{FSDD} is not available")


def tone(frequency: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * frequency * np.arange(round(rate * seconds)) / rate)).astype(np.float32)


def peak_frequency(signal: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(signal * np.hanning(len(signal))))
    return float(np.fft.rfftfreq(len(signal), 1 / rate)[np.argmax(spectrum)])


def write_folder(root: Path, rate: int = 8000) -> None:
    """Two classes, three clips each, of different lengths and tones."""
    for label, frequency in (("high", 1000.0), ("low", 300.0)):
        (root / label).mkdir(parents=True)
        for index, seconds in enumerate((0.1, 0.25, 0.3)):
            soundfile.write(root / label / f"{index}.wav", tone(frequency, rate, seconds), rate)


def folder_config(root: Path, **overrides) -> AudioDataConfig:
    values = dict(source="audiofolder", path=str(root), clip_seconds=0.2, val_fraction=0.0, test_fraction=0.34)
    return AudioDataConfig(**{**values, **overrides})


# --- FSDD ---------------------------------------------------------------------------------------


@needs_fsdd
def test_fsdd_loads_with_the_official_split():
    data = load_audio_dataset(AudioDataConfig(source="fsdd", path=str(FSDD), val_fraction=0.0))
    assert (len(data.train), len(data.val), len(data.test)) == (2700, 0, 300)
    assert data.num_classes == 10 and data.class_names == [str(d) for d in range(10)]
    assert np.bincount(data.test.labels).tolist() == [30] * 10
    assert data.train.waveforms.shape[1:] == (1, 8000) and data.train.waveforms.dtype == np.float32
    assert data.train.waveforms.min() >= -1.0 and data.train.waveforms.max() < 1.0
    # Padding is exactly zero and lengths match the raw clips (cropped to one second).
    with np.load(FSDD) as arrays:
        offsets, is_test = arrays["offsets"], arrays["is_test"]
        first_test = int(np.flatnonzero(is_test)[0])
        raw = arrays["audio"][offsets[first_test] : offsets[first_test + 1]]
    assert data.test.lengths[0] == min(len(raw), 8000)
    np.testing.assert_allclose(data.test.waveforms[0, 0, : data.test.lengths[0]], raw[:8000] / 32768.0)
    for split in (data.train, data.test):
        mask = lengths_to_mask(split.lengths, split.waveforms.shape[-1]).numpy()
        assert not np.any(split.waveforms[:, 0][~mask])


@needs_fsdd
def test_fsdd_val_and_subsets_are_class_balanced_and_seeded():
    config = AudioDataConfig(source="fsdd", path=str(FSDD), max_train=200, max_test=50, val_fraction=0.1)
    data = load_audio_dataset(config)
    again = load_audio_dataset(config)
    assert (len(data.train), len(data.val), len(data.test)) == (180, 20, 50)
    assert np.bincount(data.val.labels).tolist() == [2] * 10
    assert np.bincount(data.test.labels).tolist() == [5] * 10
    np.testing.assert_array_equal(data.train.waveforms, again.train.waveforms)


# --- audio folders ------------------------------------------------------------------------------


def test_audiofolder_classes_lengths_and_padding(tmp_path):
    write_folder(tmp_path)
    data = load_audio_dataset(folder_config(tmp_path))
    assert data.class_names == ["high", "low"] and data.num_classes == 2
    assert len(data.train) + len(data.test) == 6 and len(data.test) == 2
    everything = [data.train, data.test]
    lengths = np.concatenate([split.lengths for split in everything])
    assert sorted(lengths.tolist()) == [800, 800, 1600, 1600, 1600, 1600]  # 0.1 s kept, 0.25/0.3 s cropped
    for split in everything:
        assert split.waveforms.shape[1:] == (1, 1600)
        for waveform, length, label in zip(split.waveforms, split.lengths, split.labels):
            assert not waveform[0, length:].any()
            expected = 1000.0 if data.class_names[label] == "high" else 300.0
            assert abs(peak_frequency(waveform[0, :length], 8000) - expected) < 30


def test_audiofolder_with_train_and_test_folders_keeps_them(tmp_path):
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "test")
    data = load_audio_dataset(folder_config(tmp_path, clip_seconds=0.0))
    assert (len(data.train), len(data.test)) == (6, 6)
    assert data.train.waveforms.shape[-1] == 2400  # padded to the longest clip (0.3 s)


def test_resampling_a_16khz_file_keeps_its_frequency(tmp_path):
    soundfile.write(tmp_path / "a.wav", tone(440.0, 16000, 0.5), 16000)
    clip = read_audio_file(tmp_path / "a.wav", folder_config(tmp_path))
    assert clip.shape == (1, 4000)
    assert abs(peak_frequency(clip[0], 8000) - 440.0) < 4
    np.testing.assert_allclose(clip[0, 100:-100], tone(440.0, 8000, 0.5)[100:-100], atol=2e-3)


def test_resampler_matches_an_analytic_tone_and_removes_what_would_alias():
    for orig, new in ((16000, 8000), (8000, 22050), (44100, 8000)):
        x = torch.from_numpy(tone(300.0, orig, 0.5).astype(np.float64))
        y = resample(x, orig, new)
        assert y.shape == (math.ceil(len(x) * new / orig),)
        expected = torch.from_numpy(tone(300.0, new, 0.5).astype(np.float64))[: len(y)]
        margin = new // 20
        assert (y - expected)[margin:-margin].abs().max() < 2e-3
    above_nyquist = resample(torch.from_numpy(tone(6000.0, 16000, 0.5)), 16000, 8000)
    assert above_nyquist[400:-400].abs().max() < 0.01
    batch = torch.randn(2, 3, 1000, generator=torch.Generator().manual_seed(0))
    assert resample(batch, 16000, 8000).shape == (2, 3, 500)


def test_rate_mismatch_without_resampling_names_the_file(tmp_path):
    soundfile.write(tmp_path / "fast.wav", tone(440.0, 16000, 0.1), 16000)
    with pytest.raises(DataError, match=r"fast\.wav.*16000 Hz.*8000 Hz"):
        load_audio_dataset(folder_config(tmp_path, resample=False))


def test_corrupt_file_names_the_file(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "low" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(40))
    with pytest.raises(DataError, match=r"broken\.wav"):
        load_audio_dataset(folder_config(tmp_path))


def test_stereo_is_downmixed_unless_channels_are_strict(tmp_path):
    left, right = tone(440.0, 8000, 0.1), tone(440.0, 8000, 0.1, amplitude=0.1)
    soundfile.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 8000, subtype="FLOAT")
    clip = read_audio_file(tmp_path / "stereo.wav", folder_config(tmp_path))
    np.testing.assert_allclose(clip[0], (left + right) / 2, atol=1e-6)
    with pytest.raises(DataError, match=r"stereo\.wav.*2 channel.*mono expected"):
        read_audio_file(tmp_path / "stereo.wav", folder_config(tmp_path, strict_channels=True))
    soundfile.write(tmp_path / "mono.wav", left, 8000)
    with pytest.raises(DataError, match=r"mono\.wav.*1 channel.*asks for 2"):
        read_audio_file(tmp_path / "mono.wav", folder_config(tmp_path, channels=2))


def test_empty_or_missing_folders_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_audio_dataset(folder_config(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("no audio here")
    with pytest.raises(DataError, match="holds no audio files"):
        load_audio_dataset(folder_config(tmp_path))


def test_center_crop_keeps_the_middle(tmp_path):
    ramp = np.linspace(-0.5, 0.5, 3000, dtype=np.float32)
    soundfile.write(tmp_path / "ramp.wav", ramp, 8000, subtype="FLOAT")
    soundfile.write(tmp_path / "ramp2.wav", ramp, 8000, subtype="FLOAT")
    data = load_audio_dataset(folder_config(tmp_path, clip_seconds=0.125, crop="center", test_fraction=0.5))
    np.testing.assert_allclose(data.train.waveforms[0, 0], ramp[1000:2000])


def test_peak_level_scales_every_clip_from_its_whole_recording(tmp_path):
    quiet, loud = tone(300.0, 8000, 0.3, amplitude=0.02), tone(300.0, 8000, 0.3, amplitude=0.6)
    loud[2000] = 0.9  # the peak lies after the 0.2 s crop: the scale still comes from the whole clip
    soundfile.write(tmp_path / "quiet.wav", quiet, 8000, subtype="FLOAT")
    soundfile.write(tmp_path / "loud.wav", loud, 8000, subtype="FLOAT")
    soundfile.write(tmp_path / "silent.wav", np.zeros(800, dtype=np.float32), 8000, subtype="FLOAT")
    data = load_audio_dataset(folder_config(tmp_path, peak_level=0.5, test_fraction=0.34))
    clips = {round(float(np.abs(w).max()), 3): w for split in (data.train, data.test) for w in split.waveforms}
    assert sorted(clips) == [0.0, 0.333, 0.5]  # silent stays silent; loud: 0.6 * 0.5 / 0.9
    raw = load_audio_dataset(folder_config(tmp_path, test_fraction=0.34))
    assert sorted(round(float(np.abs(w).max()), 3) for s in (raw.train, raw.test) for w in s.waveforms) == [0.0, 0.02, 0.6]
    with pytest.raises(ValueError, match="peak_level"):
        folder_config(tmp_path, peak_level=1.5)


# --- configs, masks and tensors --------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_bad_values():
    unknown_key = r"unknown key\(s\) \[.clip_secs.\] in \[audio_data\]; valid keys:.*clip_seconds"
    with pytest.raises(ValueError, match=unknown_key):
        AudioDataConfig.from_dict({"source": "fsdd", "path": "x.npz", "clip_secs": 1.0})
    with pytest.raises(ValueError, match="source"):
        AudioDataConfig(source="wav", path="x")
    with pytest.raises(ValueError, match="needs data.path"):
        AudioDataConfig(source="fsdd")
    assert AudioDataConfig.from_dict({"path": "x.npz", "clip_seconds": 0.5}).clip_samples == 4000


def test_masks_and_tensor_items():
    assert lengths_to_mask(np.array([0, 2, 4]), 4).tolist() == [
        [False] * 4, [True, True, False, False], [True] * 4]
    from pipelines.audio_data import AudioSplit

    split = AudioSplit(np.ones((2, 1, 5), dtype=np.float32), np.array([3, 5]), np.array([1, 0]))
    item = AudioTensorDataset(split)[0]
    assert item["waveform"].shape == (1, 5) and item["waveform"].dtype == torch.float32
    assert item["mask"].tolist() == [True, True, True, False, False]
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 1
    unlabelled = AudioTensorDataset(AudioSplit(split.waveforms, split.lengths, None))[1]
    assert "label" not in unlabelled
