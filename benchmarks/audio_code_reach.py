"""How far one changed code reaches in an audio codec's decoded waveform: the share of the change's energy
within R frames of the code, for choosing the code search's `--reach`.

    python benchmarks/audio_code_reach.py runs/fsdd_cpu --clips 20 --out reach.json

On `--clips` test clips of a finished audio run (as it holds them: its clip window, padding included), the encoder's code at each of `--positions` frames (level
0) is replaced by a random code, one frame at a time; the decoded waveform's change is summed frame by frame
over the clips and positions, by distance from the changed frame. The decoder's reach
(`decoder_reach_frames`) bounds where the change can land at all; this says where its energy lies.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from pipelines.audio_data import load_audio_dataset
from pipelines.prompting import resolved_run_config
from pipelines.stages import load_matched_pair
from tokenizers_vq.audio_code_search import as_grid, from_grid

try:
    from benchmarks.audio_codec_eval import machine, save_record
except ImportError:  # run as a script
    from audio_codec_eval import machine, save_record

SHOWN = (0, 1, 2, 4, 8, 12, 16, 24, 32, 48)  # reaches printed (all are kept in the JSON)


@torch.no_grad()
def energy_by_distance(tokenizer, clips: torch.Tensor, positions: list[int], seed: int = 0) -> torch.Tensor:
    """`(2 x reach + 1,)` energy of the decoded change at each distance -reach .. reach from a changed code,
    summed over the clips and `positions`."""
    codes = as_grid(tokenizer.encode(clips))
    reach, hop, frames = tokenizer.decoder_reach_frames, tokenizer.hop_length, codes.shape[1]
    decode = lambda grid: tokenizer.decode(from_grid(grid, tokenizer.num_codebooks)).float()[..., : frames * hop]
    base, generator = decode(codes), torch.Generator().manual_seed(seed)
    energy = torch.zeros(2 * reach + 1)
    for at in positions:
        changed = codes.clone()
        changed[:, at, 0] = torch.randint(0, tokenizer.quantizer.codebook_size, (len(codes),), generator=generator)
        by_frame = rearrange((decode(changed) - base).square(), "n c (f hop) -> n c f hop", hop=hop).sum(dim=(0, 1, 3))
        near = torch.arange(max(0, at - reach), min(frames, at + reach + 1))
        energy[near - at + reach] += by_frame[near]
    return energy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished audio run")
    parser.add_argument("--data", default=None, help="the run's audio data path, if it has moved")
    parser.add_argument("--clips", type=int, default=20, help="test clips spread over the split")
    parser.add_argument("--positions", type=int, default=10, help="frames changed, one at a time, mid-clip")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = resolved_run_config(args.run)
    data_config = config.audio_data if args.data is None else dataclasses.replace(config.audio_data, path=args.data)
    tokenizer, _, _ = load_matched_pair(args.run, "cpu")
    split = load_audio_dataset(data_config).splits()["test"]
    chosen = np.linspace(0, len(split) - 1, min(args.clips, len(split))).round().astype(int)
    clips = torch.from_numpy(split.waveforms[chosen]).float()
    frames = clips.shape[-1] // tokenizer.hop_length
    positions = np.linspace(frames // 4, 3 * frames // 4, args.positions).round().astype(int).tolist()
    energy = energy_by_distance(tokenizer, clips, positions)
    reach = tokenizer.decoder_reach_frames
    share = {r: float(energy[reach - r : reach + r + 1].sum() / energy.sum()) for r in range(reach + 1)}
    for r in SHOWN:
        if r <= reach:
            print(f"within {r:>2} frames: {100 * share[r]:.2f}% of the change's energy")
    save_record({"run": str(args.run), "machine": machine(args), "date": datetime.date.today().isoformat(),
                 "clips": len(chosen), "positions": positions, "decoder_reach_frames": reach,
                 "hop_length": tokenizer.hop_length, "share_within": share}, args.out)


if __name__ == "__main__":
    main()
