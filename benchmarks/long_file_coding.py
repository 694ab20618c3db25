"""What `tokgen compress --input` costs on long recordings, against the same speech as separate clips.

    python benchmarks/long_file_coding.py runs/fsdd_cpu --fsdd fsdd.npz --out long_files.json

FSDD's test split (300 clips, 6 speakers) is written out twice as WAV files: once as the 300 clips,
once as one long file per speaker (that speaker's 50 test clips end to end, in file-name order, each
with the silence it was recorded with; about 20 s each). Both go through `compress_files`, the
run's codec for a user's own files. A long file is coded in segments of the run's clip length, each
from its own start, so a segment begins wherever the cut falls, often mid-word; a clip of FSDD
begins at its digit's onset, as the prior's training clips did. The difference between the two
rates is what the segments' fresh starts (and speech cut mid-word) cost. Reported for each form:
bits per second of the streams, with the per-item framing, and of the whole file, the plain rate,
and the SI-SNR of the decoded files against the files as read. For the long files the SI-SNR is also
given over each clip's stretch of its speaker's file, the same 300 stretches as the separate clips:
a long file is scaled to the run's peak level as a whole, so its quieter clips reach the codec
quieter than they do alone. With `--search-sweeps` the codes are searched by synthesis
(`pipelines.searched_encoding`), and `--forms long` codes only the long files.
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch

from pipelines.audio_data import read_audio_file
from pipelines.compression import decompress_file
from pipelines.file_compression import compress_files, decode_sources
from pipelines.prompting import resolved_run_config
from pipelines.searched_encoding import CodeSearch
from tokenizers_vq import load_tokenizer
from tokenizers_vq.audio_losses import si_snr

try:
    from benchmarks.audio_codec_eval import machine, save_record
except ImportError:  # run as a script
    from audio_codec_eval import machine, save_record


def write_test_split(fsdd: Path, folder: Path) -> tuple[Path, Path, dict[str, list[int]]]:
    """FSDD's test clips as `folder/clips/SPEAKER/NAME.wav` and as `folder/long/SPEAKER.wav`, and the
    clips' lengths in each long file, in order."""
    with np.load(fsdd, allow_pickle=False) as arrays:
        audio, offsets, is_test = arrays["audio"], arrays["offsets"], arrays["is_test"].astype(bool)
        speakers, names = arrays["speaker"], arrays["filenames"]
        speaker_names, rate = arrays["speaker_names"], int(arrays["sample_rate"])
    clips_dir, long_dir, lengths = folder / "clips", folder / "long", {}
    for speaker, speaker_name in enumerate(speaker_names):
        (clips_dir / str(speaker_name)).mkdir(parents=True)
        index = [i for i in np.flatnonzero(is_test & (speakers == speaker))]
        index.sort(key=lambda i: str(names[i]))
        pieces = [audio[offsets[i] : offsets[i + 1]] for i in index]
        for i, piece in zip(index, pieces):
            soundfile.write(clips_dir / str(speaker_name) / f"{Path(str(names[i])).stem}.wav", piece, rate)
        long_dir.mkdir(exist_ok=True)
        soundfile.write(long_dir / f"{speaker_name}.wav", np.concatenate(pieces), rate)
        lengths[str(speaker_name)] = [len(piece) for piece in pieces]
    return clips_dir, long_dir, lengths


def si_snr_by_clip(run_dir: Path, token_file: Path, long_dir: Path, lengths: dict[str, list[int]]) -> np.ndarray:
    """SI-SNR of each clip's stretch of the decoded long files against the same stretch as read."""
    decoded = decompress_file(token_file, run_dir)
    sources = decoded.compressed.header["sources"]
    data_config = resolved_run_config(run_dir).audio_data
    tokenizer = load_tokenizer(run_dir / "tokenizer").eval()
    snrs = []
    for source, clip in zip(sources, decode_sources(tokenizer, decoded.tokens, sources, decoded.manifest, token_file)):
        original = torch.from_numpy(read_audio_file(long_dir / f"{source['name']}.wav", data_config))
        for start, end in zip(np.cumsum([0, *lengths[source["name"]][:-1]]), np.cumsum(lengths[source["name"]])):
            snrs.append(float(si_snr(clip[None, :, start:end], original[None, :, start:end]).mean()))
    return np.array(snrs)


def code(run_dir: Path, folder: Path, out: Path, search: CodeSearch) -> dict:
    start = time.perf_counter()
    _, report, quality = compress_files(run_dir, [folder], out, progress=bool(search.sweeps), search=search)
    record = report.as_dict()
    snrs = np.array([f["si_snr_db"] for f in quality["files"]])
    record.update(files=len(snrs), si_snr_db=float(snrs.mean()), si_snr_db_median=float(np.median(snrs)),
                  wall_seconds=time.perf_counter() - start)
    print(f"{folder.name}: {len(snrs)} files, {record['seconds']:.1f} s, {record['items']} items; streams "
          f"{record['stream_bits_per_second']:.0f} bit/s, framed {record['framed_bits_per_second']:.0f}, file "
          f"{record['file_bits_per_second']:.0f}, plain {record['raw_bits_per_second']:.0f}; SI-SNR "
          f"{record['si_snr_db']:.2f} dB (median {record['si_snr_db_median']:.2f})")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished audio run trained on FSDD")
    parser.add_argument("--fsdd", type=Path, required=True, help="the FSDD npz")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--forms", choices=["both", "long"], default="both", help="long: the long files only")
    parser.add_argument("--search-sweeps", type=int, default=0, help="search the codes by synthesis (0: the encoder's)")
    parser.add_argument("--search-candidates", type=int, default=8)
    parser.add_argument("--rate-weight", type=float, default=0.0, help="weigh the prior's bits in the search")
    parser.add_argument("--search-reach", type=int, default=None,
                        help="frames each side a candidate is scored over (default: the decoder's whole reach)")
    parser.add_argument("--out", default="", help="JSON file for the figures (printed either way)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    search = CodeSearch(args.search_sweeps, args.search_candidates, args.rate_weight, args.search_reach)
    record = {"run": str(args.run), "machine": machine(args), "date": datetime.date.today().isoformat(),
              "code_search": search._asdict()}
    with tempfile.TemporaryDirectory() as scratch:
        clips_dir, long_dir, lengths = write_test_split(args.fsdd, Path(scratch))
        if args.forms == "both":
            record["separate_clips"] = code(args.run, clips_dir, Path(scratch) / "clips.tgac", search)
        record["one_file_per_speaker"] = long = code(args.run, long_dir, Path(scratch) / "long.tgac", search)
        by_clip = si_snr_by_clip(args.run, Path(scratch) / "long.tgac", long_dir, lengths)
        long.update(si_snr_db_by_clip=float(by_clip.mean()), si_snr_db_by_clip_median=float(np.median(by_clip)))
        print(f"long files, over each clip's stretch: SI-SNR {by_clip.mean():.2f} dB (median {np.median(by_clip):.2f})")
    save_record(record, args.out)


if __name__ == "__main__":
    main()
