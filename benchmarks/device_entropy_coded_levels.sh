#!/usr/bin/env bash
# Issue 4 on a lent GPU: does a codec with more residual levels, entropy-coded by its own prior, reach
# 10 dB of test SI-SNR at 1.6 kbps or less? Whole FSDD runs from scratch, one process per level count
# side by side on one GPU (a 64-channel codec leaves an H200 mostly idle), then
# benchmarks/entropy_coded_bitrate.py on each: bits per second of the arithmetic-coded test tokens beside the
# plain rate (100 frames/s x levels x 8 bits), and the codec's test SI-SNR. Run from the repo root:
#
#   LEVELS="2 3 4" STEPS=1200 MINUTES=4 PRIOR_STEPS=1500 PRIOR_MINUTES=1.5 SEARCH_SWEEPS=1 OUT=/tmp/out DATA=.data bash benchmarks/device_entropy_coded_levels.sh
#   OUT=/tmp/out DATA=.data bash benchmarks/device_entropy_coded_levels.sh --quick   # CPU smoke run
#   LEVELS="1 2" OVERRIDES="tokenizer.strides=[4,5,2]" ...   # key=value overrides for every run: here 200 frames/s
#
# Earlier codecs (BENCHMARKS.md, "What bits and loss weights buy"): 2, 3 and 4 levels gave 7.9, 9.2 and 9.9 dB
# after long fine-tunes, and the config's prior codes 2-level tokens in 4.8-5.5 bits of 8. From scratch in
# MINUTES the codecs are weaker; the comparison between level counts, at one training time, is the point.
# About MINUTES + PRIOR_MINUTES + 3 minutes in all (export, 300 guided samples, the judge, the coding): it fits a
# 15-minute device budget with the machine's start. Carry .whl and .data/fsdd.npz. What comes back: the log, every
# metrics.json and the bit-rate JSON, and one codec's weights in parts (below); keep them in a git-ignored folder:
#   cat levels_N.model.safetensors.part_* > .data/fsdd_codec_levels_N/model.safetensors
#   tar xzf levels.tar.gz runs/levels_N/tokenizer/config.json && cp runs/levels_N/tokenizer/config.json .data/fsdd_codec_levels_N/
set -u
: "${OUT:?set OUT to the folder the results go to}"
: "${DATA:=.data}"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
quick=0
[[ "${1:-}" == "--quick" ]] && quick=1
runs="$OUT/runs" log="$OUT/levels.log"
mkdir -p "$runs"
config=configs/pipeline/fsdd_transformer.toml
common=(audio_data.path="$DATA/fsdd.npz" output_dir="$runs" sampling.eval_samples_per_class=30 audio.completions=2)
if ((quick)); then
    common+=(tokenizer.hidden_channels=8 tokenizer_training.max_steps=6 tokenizer_training.batch_size=4
             tokenizer_training.mixed_precision=no prior.hidden_size=32 prior.num_layers=1 prior.num_heads=2
             prior_training.max_steps=6 prior_training.batch_size=4 prior_training.mixed_precision=no
             audio.train_shifted_copies=0 sampling.eval_samples_per_class=2 sampling.grid_samples_per_class=1
             audio.classifier.network.epochs=1)
else
    # schedules short enough to finish (and decay) in the time box; the minutes only guard it
    common+=(tokenizer_training.max_steps=${STEPS:-1200} tokenizer_training.warmup_steps=200
             tokenizer_training.max_minutes=${MINUTES:-4} prior_training.max_steps=${PRIOR_STEPS:-1500}
             prior_training.max_minutes=${PRIOR_MINUTES:-1.5})
fi
read -r -a extra <<< "${OVERRIDES:-}"
common+=("${extra[@]}")
{ nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 || true; date; } > "$log"

pids=()
for levels in ${LEVELS:-2 3 4}; do
    python -m pipelines.cli run "$config" "${common[@]}" name="levels_$levels" \
        tokenizer.quantizer.num_quantizers="$levels" > "$runs/levels_$levels.log" 2>&1 &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || echo "a run failed (pid $pid): see its log in the archive" >> "$log"; done
echo "trained: $(date)" >> "$log"
finished=()
for levels in ${LEVELS:-2 3 4}; do
    [[ -f "$runs/levels_$levels/metrics.json" ]] && finished+=("$runs/levels_$levels")
done
if ((${#finished[@]})); then
    python benchmarks/entropy_coded_bitrate.py "${finished[@]}" --batch-size 300 --threads 8 --modes unconditioned \
        --out "$OUT/entropy_coded_levels.json" 2>&1 | tee -a "$log"
fi
# The codec that comes back, in 15 MB parts (a later session joins them with cat and trains on from it with
# tokenizer_init): the best test SI-SNR among the runs whose coded rate, framing included, is at most
# MAX_CODED_BPS (default 1600: the issue's target read as a coded rate), else the best of all.
best=$(python3 -c "import json, pathlib, sys
rows = []
for run in sys.argv[2:]:
    m = json.loads((pathlib.Path(run) / 'metrics.json').read_text())
    rate = m['prior'].get('entropy_coded_framed_bits_per_second', m['tokenizer']['bitrate_bps'])
    rows.append((rate <= float(sys.argv[1]), m['tokenizer']['si_snr_db'], run))
print(max(rows)[2] if rows else '')" "${MAX_CODED_BPS:-1600}" "${finished[@]}")
if [[ -n "$best" ]]; then
    echo "codec that comes back: $best" | tee -a "$log"
    split -b 15M "$best/tokenizer/model.safetensors" "$OUT/$(basename "$best").model.safetensors.part_"
fi
# SEARCH_SWEEPS > 0: the analysis-by-synthesis encoder (benchmarks/audio_code_search.py) on that codec, every test
# clip (or SEARCH_CLIPS of them), its candidates decoded on the GPU: the same decoder and plain rate, codes searched
# for the waveform.
if [[ "${SEARCH_SWEEPS:-0}" != 0 && -n "$best" ]]; then
    device=cuda
    ((quick)) && device=cpu
    # SEARCH_SECONDS bounds it, so that the archive below is still made inside the call's time limit
    timeout "${SEARCH_SECONDS:-600}" python benchmarks/audio_code_search.py "$best" --clips "${SEARCH_CLIPS:-0}" \
        --sweeps "$SEARCH_SWEEPS" --device "$device" \
        --threads 8 --out "$OUT/code_search.json" 2>&1 | grep -v "code search:" | tee -a "$log"
fi
tar czf "$OUT/levels.tar.gz" --exclude=checkpoints --exclude=tokens --exclude='*.safetensors' --exclude=wav \
    --exclude=completions --exclude=compressed -C "$OUT" runs 2>>"$log" && rm -rf "$runs"
echo "done: $(date)" >> "$log"
