#!/usr/bin/env bash
# The GPU measurements the open issues still need, as one short call on a lent GPU machine
# (device time is scarce: about 15 minutes a session, 10 a command). Run from the repo root:
#
#   OUT=/tmp/out bash benchmarks/device_checks.sh          # on the GPU machine ($OUT is set there)
#   OUT=/tmp/out bash benchmarks/device_checks.sh --quick  # a CPU smoke run of the same script
#
# No pip install there: the checkout runs with PYTHONPATH=. (the machine has torch, transformers,
# accelerate, einops, safetensors). Each benchmark writes its JSON under $OUT and has its own time
# limit, so one slow step cannot eat the others' time; a failed step is reported and the rest run.
# Most important first: quantizer bf16 throughput (issue 3), audio encode/decode speed (issue 4),
# prior training and sampling throughput (issue 2), tokenizer encode/decode (issue 2), NADE's training step (issue 5).
set -u
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
quick=()
[[ "${1:-}" == "--quick" ]] && quick=(--quick)
status=0

log="$OUT/checks.log"  # one log: the machine returns at most 8 files from $OUT
# The step limits add up to more than a command may run (600 s), so each step also stops at the
# script's deadline: a step cut short is reported, and the folder still comes back.
deadline=$((SECONDS + ${CHECKS_BUDGET_S:-570}))

step() {  # step NAME SECONDS command...: run with a time limit, its output appended to the log
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS left=$((deadline - SECONDS))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then
        echo "SKIPPED $name (the script's ${CHECKS_BUDGET_S:-570} s are spent)"
        status=1
        return
    fi
    echo "===== $name: $*" >> "$log"
    if timeout "$limit" "$@" >> "$log" 2>&1; then
        echo "ok      $name ($((SECONDS - start)) s)"
    else
        echo "FAILED  $name (exit $?, $((SECONDS - start)) s); last lines:"
        tail -5 "$log"
        status=1
    fi
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } > "$log" 2>&1
step quantizers 150 python benchmarks/bench_quantizers.py "${quick[@]}" --out "$OUT/bench_quantizers.json"
step audio 120 python benchmarks/bench_audio.py "${quick[@]}" --out "$OUT/bench_audio.json"
step prior 240 python benchmarks/bench_prior.py "${quick[@]}" --out "$OUT/bench_prior.json"
step tokenizer 90 python benchmarks/bench_tokenizer.py "${quick[@]}" --out "$OUT/bench_tokenizer.json"
# last and short (seconds on a GPU): whether NADE's blocked pre-activations also beat the cumulative sum there
step nade_training 30 python benchmarks/bench_baseline_training.py "${quick[@]}" --out "$OUT/bench_nade_training.json"
head -3 "$log"
exit $status
