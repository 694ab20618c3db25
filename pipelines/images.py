"""Pictures of a run: PNG image grids and small matplotlib plots.

Grids are assembled as numpy arrays and written with Pillow, so that a grid of n images of size
(h, w) with padding p and nrow columns is exactly `(cols * (w + p) + p) * scale` pixels wide,
whatever the backend (the layout of torchvision's `make_grid`, without needing torchvision).
Plots use matplotlib's object-oriented `Figure` with the Agg canvas, never `pyplot`, so that no
global figure state is created or leaked. The code histogram (codes sorted by frequency on a log
axis) is the usual picture of codebook collapse in VQ models (van den Oord et al. 2017, "Neural
Discrete Representation Learning"; Dhariwal et al. 2020, "Jukebox", on dead codes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from einops import rearrange
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

# Grey borders are visible against both black (MNIST) and white backgrounds.
DEFAULT_PAD_VALUE = 0.5


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """(n c h w) in [-1, 1] -> float (n c h w) in [0, 1] on the CPU."""
    if images.ndim != 4:
        raise ValueError(f"expected images (n c h w), got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"expected 1 (grayscale) or 3 (RGB) channels, got {images.shape[1]}")
    return ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)


def _blank_like(images: torch.Tensor, count: int, pad_value: float) -> torch.Tensor:
    """`count` images filled with the padding colour, in the [-1, 1] convention, to fill ragged rows."""
    return torch.full((count, *images.shape[1:]), pad_value * 2.0 - 1.0, dtype=images.dtype)


def grid_array(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = DEFAULT_PAD_VALUE) -> np.ndarray:
    """(n c h w) in [-1, 1] -> uint8 (H W c) grid with `nrow` images per row, row-major."""
    if nrow <= 0:
        raise ValueError(f"nrow must be positive, got {nrow}")
    unit = _to_unit_range(images)
    count, channels, height, width = unit.shape
    columns = min(nrow, max(count, 1))
    rows = max(math.ceil(count / columns), 1)
    canvas = torch.full((channels, rows * (height + padding) + padding, columns * (width + padding) + padding),
                        pad_value)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = padding + row * (height + padding), padding + column * (width + padding)
        canvas[:, top : top + height, left : left + width] = unit[index]
    return (rearrange(canvas, "c h w -> h w c") * 255.0).round().to(torch.uint8).numpy()


def save_image_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2, scale: int = 1,
                    pad_value: float = DEFAULT_PAD_VALUE) -> Path:
    """Write (n c h w) images in [-1, 1] as one PNG grid, `nrow` images per row, upscaled `scale` times."""
    array = grid_array(images, nrow, padding, pad_value)
    # 2-D uint8 arrays become "L" (grayscale) images, (h w 3) ones "RGB".
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale != 1:
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        # Nearest neighbour keeps pixels crisp: a generated pixel should look like one.
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path


def class_rows_grid(samples_by_class: Sequence[torch.Tensor], path, padding: int = 2, scale: int = 1,
                    pad_value: float = DEFAULT_PAD_VALUE) -> Path:
    """One row per class; each entry of `samples_by_class` is (k c h w). Short rows are padded."""
    if not samples_by_class:
        raise ValueError("no rows to draw")
    columns = max(max(len(row) for row in samples_by_class), 1)
    reference = next(row for row in samples_by_class if len(row)) if any(len(row) for row in samples_by_class) else None
    if reference is None:
        raise ValueError("every row is empty")
    rows = [torch.cat([row.detach().float().cpu(), _blank_like(reference.float().cpu(), columns - len(row), pad_value)])
            for row in samples_by_class]
    return save_image_grid(torch.cat(rows), path, nrow=columns, padding=padding, scale=scale, pad_value=pad_value)


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path, nrow: int = 8,
                        padding: int = 2, scale: int = 1, pad_value: float = DEFAULT_PAD_VALUE) -> Path:
    """Row pairs: `nrow` originals, then their reconstructions directly below, repeated."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"shapes differ: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
    originals, reconstructions = originals.detach().float().cpu(), reconstructions.detach().float().cpu()
    rows = []
    for start in range(0, len(originals), nrow):
        top, bottom = originals[start : start + nrow], reconstructions[start : start + nrow]
        filler = _blank_like(originals, nrow - len(top), pad_value)
        rows += [top, filler, bottom, filler]
    return save_image_grid(torch.cat(rows), path, nrow=nrow, padding=padding, scale=scale, pad_value=pad_value)


def _save_figure(figure: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=100)
    return path


def plot_code_histogram(counts, path, title: str = "code frequencies") -> Path:
    """Code counts (codebook_size,) -> PNG of frequencies sorted high to low on a log y-axis."""
    counts = torch.as_tensor(counts).detach().double().cpu().reshape(-1)
    total = counts.sum().item()
    if total <= 0:
        raise ValueError("counts are all zero")
    frequencies = (counts / total).sort(descending=True).values.numpy()
    used = int((frequencies > 0).sum())
    figure = Figure(figsize=(6, 3.5))
    axes = figure.subplots()
    # Dead codes cannot sit on a log axis; they are counted in the title instead.
    ranks = np.arange(1, used + 1)
    # One filled step polygon rather than a bar per code: codebooks reach tens of thousands of codes.
    axes.fill_between(ranks, frequencies[:used], frequencies[used - 1] / 2.0, step="mid", color="tab:blue")
    axes.set_yscale("log")
    axes.set_xlim(0, len(frequencies) + 1)
    axes.set_xlabel("code rank (most frequent first)")
    axes.set_ylabel("frequency")
    axes.set_title(f"{title}\n{used}/{len(frequencies)} codes used, {len(frequencies) - used} dead")
    figure.tight_layout()
    return _save_figure(figure, path)


def plot_training_curves(history: list[dict], path, keys: Sequence[str], step_key: str = "step") -> Path:
    """One panel per key; x is `history[i][step_key]` when present, else the entry's position."""
    if not keys:
        raise ValueError("no keys to plot")
    figure = Figure(figsize=(5 * len(keys), 3.5))
    panels = figure.subplots(1, len(keys), squeeze=False)[0]
    for axes, key in zip(panels, keys):
        points = [(entry.get(step_key, position), float(entry[key]))
                  for position, entry in enumerate(history) if key in entry]
        if points:
            steps, values = zip(*points)
            axes.plot(steps, values)
        axes.set_title(key)
        axes.set_xlabel(step_key)
    figure.tight_layout()
    return _save_figure(figure, path)
