"""What an audio run's codec costs once its tokens are entropy-coded with the run's own prior.

    python benchmarks/entropy_coded_bitrate.py runs/fsdd_cpu [more run folders] --out bitrate.json

A codec with `q` codebooks of `K` codes at `f` frames per second sends `f * q * log2(K)` bits per
second when each code is written plainly (1.6 kbps for FSDD's 100 x 2 x 8). The run's prior
predicts each token from those before it, so arithmetic coding under it sends about its NLL instead
(EnCodec, Defossez et al. 2022, section 3.3). For every run this codes the test split twice, without
and with the class label (`tokgen compress`), decodes it and checks every token, and reports:

- bits per second of the streams alone, with each clip's framing (lengths, CRC), and of the whole
  file, beside the plain rate and the ideal (the prior's NLL);
- the spread over clips (a short clip pays its framing and closing bits over less audio);
- the codec's test SI-SNR from the run's metrics.json: entropy coding is lossless, so the clips the
  decoder hears, and their SI-SNR, are the same at either rate;
- round-trip speed (encode + decode) in tokens per second;
- the prior's NLL of each residual level apart (bits per code): what one more level costs once coded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from pipelines.compression import CompressedTokens, compress_split
from pipelines.stages import load_matched_pair

try:
    from benchmarks.audio_codec_eval import machine, save_record
except ImportError:  # run as a script, `python benchmarks/entropy_coded_bitrate.py`
    from audio_codec_eval import machine, save_record


def clip_rates(path: Path, sample_rate: int) -> dict:
    """Percentiles over clips of each clip's framed bits per second."""
    items = CompressedTokens.from_bytes(path.read_bytes(), path).items
    rates = np.array([8 * (len(item.framing()) + len(item.stream)) * sample_rate / item.num_samples for item in items])
    return {f"clip_framed_bits_per_second_p{p}": float(np.percentile(rates, p)) for p in (10, 50, 90)}


def bits_by_level(run_dir: Path, batch_size: int, limit: int | None) -> list[float]:
    """The prior's test NLL (unconditioned, bits per code) of each residual level: what each level costs
    once coded. Both layouts put codebook `k` at the positions `k mod q`."""
    _, prior, tokenset = load_matched_pair(run_dir, "cpu")
    test = {name: values[:limit] for name, values in tokenset.tensors("test").items()}
    batches = [slice(start, start + batch_size) for start in range(0, len(test["input_ids"]), batch_size)]
    with torch.no_grad():
        log_probs = torch.cat([prior.token_log_probs(test["input_ids"][rows], None, test["loss_mask"][rows])
                               for rows in batches])
    levels = tokenset.manifest.num_codebooks
    per_level = rearrange(log_probs, "n (steps q) -> q (n steps)", q=levels)
    counted = rearrange(test["loss_mask"], "n (steps q) -> q (n steps)", q=levels).sum(dim=1)
    return (-per_level.sum(dim=1) / counted / np.log(2.0)).tolist()


def measure_run(run_dir: Path, batch_size: int, limit: int | None, modes: list[str]) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = {"run": str(run_dir), "plain_bits_per_second": metrics["tokenizer"].get("bitrate_bps"),
              "test_si_snr_db": metrics["tokenizer"].get("si_snr_db"),
              "prior_test_bits_per_token": metrics["prior"].get("bits_per_token"),
              "ideal_bits_per_code_by_level": bits_by_level(run_dir, batch_size, limit)}
    print(f"{run_dir.name}: unconditioned NLL by level (bits per code): "
          + ", ".join(f"{bits:.2f}" for bits in record["ideal_bits_per_code_by_level"]))
    sample_rate = metrics["data_source"]["sample_rate"]
    for name in modes:
        conditioned = name == "conditioned"
        started = time.perf_counter()
        path, report = compress_split(run_dir, "test", run_dir / "compressed" / f"test_{name}.tgac", conditioned,
                                      batch_size, limit, progress=False)
        seconds = time.perf_counter() - started
        figures = report.as_dict() | clip_rates(path, sample_rate)
        figures["round_trip_tokens_per_second"] = report.tokens / seconds
        record[name] = figures
        print(f"{run_dir.name} {name}: {figures['stream_bits_per_second']:.0f} bit/s streams, "
              f"{figures['framed_bits_per_second']:.0f} framed, {figures['file_bits_per_second']:.0f} file "
              f"(plain {figures['raw_bits_per_second']:.0f}, ideal {report.ideal_bits / report.seconds:.0f}); "
              f"{figures['stream_bits_per_token']:.3f} bits/token; round trip {seconds:.1f} s")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished audio run folders (tokenizer, tokens, prior)")
    parser.add_argument("--out", default="", help="JSON file for the figures (printed either way)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="only the first N test clips")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=["unconditioned", "conditioned"],
                        choices=["unconditioned", "conditioned"], help="code without and/or with the class label")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = {"command": "python benchmarks/entropy_coded_bitrate.py " + " ".join(map(str, args.runs)),
              "machine": machine(args), "date": datetime.date.today().isoformat(),
              "runs": [measure_run(run, args.batch_size, args.limit, args.modes) for run in args.runs]}
    save_record(record, args.out)


if __name__ == "__main__":
    main()
