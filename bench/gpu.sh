#!/usr/bin/env bash
# One check of a fresh GPU machine, about 6 minutes on one H100 (every part has a time limit, and none starts that
# could end past TOTAL_S, 540 s): the wheels of .whl/ installed, the versions and the device, smoke tests, GPT-2 small
# (124M, configs/gpt2_small.py) training throughput in several variants with its MFU, an attention probe (cuDNN
# against XLA), and the train step's compiled HLO. Every part reports and the script goes on; a summary ends it, and
# its exit status is 1 when anything failed.
#
#   bash bench/gpu.sh            # on the GPU machine, from anywhere (it runs in the repository root)
#   bash bench/gpu.sh --dry      # the same path on CPU with a tiny model (a check of the script; tests run it)
#
# Environment: OUT (where the figures go; default /tmp/ablax_gpu), WHEELS (default .whl: made by
# bench/gpu_wheels.sh; installed with --no-index), PYTHON (python3), SMOKE_EXTRA (more pytest arguments, run as one
# more smoke group), BATCH (rows per throughput step; 16 on GPU), TOTAL_S (540).
# $OUT gets three files (the device tool returns at most 8): gpu.log (all output), gpu_summary.json (every figure and
# outcome) and hlo_train_step.tar.gz (the einsum variant's train step: optimized HLO, buffer assignment).
set -uo pipefail  # no -e: a failed part is recorded and the next one runs
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/ablax_gpu}
WHEELS=${WHEELS:-.whl}
TOTAL_S=${TOTAL_S:-540}
DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d)  # each part's files; only the three named above go to $OUT
trap 'rm -rf "$WORK"' EXIT
: >"$WORK/results.tsv"
exec > >(tee "$OUT_DIR/gpu.log") 2>&1
TEE_PID=$!
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ $DRY == 1 ]]; then
  export JAX_PLATFORMS=cpu
  SMOKE_GROUPS=("model|tests/test_model.py|decoder_matches_numpy_reference")
  MODEL=(--vocab_size=256 --config.model.num_layers=2 --config.model.d_model=64 --config.model.num_heads=2
         --config.model.max_len=64 --config.train.seq_len=64 --config.train.batch_size="${BATCH:-2}" --steps=2
         --warmup=1)
  FIRST_PEAKS=(--peak_f32_gflops=1 --peak_bf16_gflops=2)  # not measured on CPU (slow; its MFU means nothing here)
  PROBE=(--sizes=1x128 --heads=2 --head_dim=16 --calls=2 --reps=2)
  LIMIT_SMOKE=120 LIMIT_VARIANT=120 LIMIT_PROBE=60
else
  export JAX_PLATFORMS=cuda
  MODEL_TESTS="causality_values or decoder_matches_numpy_reference or remat_matches_no_remat or gqa_equals_mha"
  MODEL_TESTS+=" or dot_product_attention_matches_einsum or mixed_precision or softmax_derivative or scan_and_remat"
  # group|file|pytest -k: model tests, and the GPU kernels of model/flash.py (Triton natively, cuDNN's dispatch)
  SMOKE_GROUPS=("model|tests/test_model.py|$MODEL_TESTS" "flash|tests/test_flash.py|triton or cudnn")
  # GPT-2's vocabulary padded to a multiple of 64, as nanoGPT does; 16 x 1024 leaves room for einsum's T^2 scores.
  MODEL=(--vocab_size=50304 --config.train.batch_size="${BATCH:-16}" --steps=10 --warmup=2)
  FIRST_PEAKS=()  # measured by the first variant
  PROBE=(--sizes=8x1024,8x4096)
  LIMIT_SMOKE=150 LIMIT_VARIANT=150 LIMIT_PROBE=120
fi

# part ITEM LIMIT_S COMMAND...: runs COMMAND (output shown and kept) under a time limit, unless it could end past
# TOTAL_S; records passed / failed / skipped with the seconds and, for a failure, its last error line.
part() {
  local name=$1 item=$2 limit=$3 started=$SECONDS rc detail=""
  shift 3
  echo "== $name: $item"
  if ((SECONDS + limit > TOTAL_S)); then
    detail="time budget: ${SECONDS}s gone, ${limit}s limit, ${TOTAL_S}s total"
    echo "skipped: $detail"
    printf '%s\t%s\tskipped\t0\t%s\n' "$name" "$item" "$detail" >>"$WORK/results.tsv"
    return 0
  fi
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/part.log"
  rc=${PIPESTATUS[0]}
  if ((rc == 0)); then
    printf '%s\t%s\tpassed\t%d\t\n' "$name" "$item" $((SECONDS - started)) >>"$WORK/results.tsv"
    return 0
  fi
  if ((rc == 124 || rc == 137)); then
    detail="timed out after ${limit}s"
  else
    detail=$(grep -E '^(error|FAILED|ERROR|E +[A-Za-z]*Error)' "$WORK/part.log" | tail -1)
    [[ -n $detail ]] || detail=$(grep -v '^\s*$' "$WORK/part.log" | tail -1)
    detail="exit $rc: ${detail:0:240}"
  fi
  printf '%s\t%s\tfailed\t%d\t%s\n' "$name" "$item" $((SECONDS - started)) "${detail//$'\t'/ }" >>"$WORK/results.tsv"
  echo "FAILED ($name: $item): $detail"
  return 1
}

skip() {  # skip PART ITEM REASON
  echo "== $1: $2"$'\n'"skipped: $3"
  printf '%s\t%s\tskipped\t0\t%s\n' "$1" "$2" "$3" >>"$WORK/results.tsv"
}

if compgen -G "$WHEELS/*.whl" >/dev/null; then
  part setup wheels 120 "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
    "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:$WORK/site"
else
  skip setup wheels "no $WHEELS/*.whl (bash bench/gpu_wheels.sh makes them; carry .whl)"
fi

[[ $DRY == 1 ]] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
part setup versions 120 "$PYTHON" bench/gpu_report.py env "$WORK/env.json"

# Float32 matmuls at full precision, so the tests' float32 tolerances hold on tensor cores too; no -x: every failure.
SMOKE=(env JAX_DEFAULT_MATMUL_PRECISION=highest "$PYTHON" -m pytest -q -rfE -p no:cacheprovider)
for group in "${SMOKE_GROUPS[@]}"; do
  IFS='|' read -r name file selection <<<"$group"
  if [[ -f $file ]]; then
    part smoke "$name" "$LIMIT_SMOKE" "${SMOKE[@]}" --junitxml="$WORK/smoke_$name.xml" "$file" -k "$selection"
  else
    skip smoke "$name" "no $file"
  fi
done
if [[ -n "${SMOKE_EXTRA:-}" ]]; then
  read -r -a extra <<<"$SMOKE_EXTRA"
  part smoke extra "$LIMIT_SMOKE" "${SMOKE[@]}" --junitxml="$WORK/smoke_extra.xml" "${extra[@]}"
fi

# Throughput variants. The first one measures the matmul peaks; later ones reuse its peaks.
peaks=("${FIRST_PEAKS[@]}")
have_peaks=0
variant() {  # variant NAME OVERRIDES...
  local name=$1 json="$WORK/throughput_$1.json"
  shift
  # Its compiled HLO says which kernels the step calls (the summary counts the custom calls of each variant).
  local dump=(XLA_FLAGS="${XLA_FLAGS:-} --xla_dump_to=$WORK/hlo_$name --xla_dump_hlo_as_text")
  part throughput "$name" "$LIMIT_VARIANT" env "${dump[@]}" "$PYTHON" bench/throughput.py \
    --config=configs/gpt2_small.py "${MODEL[@]}" "${peaks[@]}" "$@" --json_out="$json"
  if ((!have_peaks)) && [[ -f $json ]]; then
    read -r -a peaks < <("$PYTHON" -c 'import json, sys; f = json.load(open(sys.argv[1]))
print("--peak_f32_gflops=%r --peak_bf16_gflops=%r" % (f["peak_f32_matmul_gflops_per_s"],
                                                     f["peak_bf16_matmul_gflops_per_s"]))' "$json") && have_peaks=1
  fi
}
variant einsum --config.model.attention_impl=einsum
if [[ -d $WORK/hlo_einsum ]]; then
  part hlo train_step 60 "$PYTHON" bench/gpu_report.py hlo "$WORK/hlo_einsum" "$OUT_DIR/hlo_train_step.tar.gz"
else
  skip hlo train_step "no XLA dump (the einsum variant did not compile)"
fi
if [[ $DRY == 1 ]]; then
  skip throughput cudnn "no GPU (cuDNN attention needs one)"
else
  variant cudnn --config.model.attention_impl=cudnn
fi
variant remat_dots --config.model.attention_impl=einsum --config.model.remat=True --config.model.remat_policy=dots
variant remat_full --config.model.attention_impl=einsum --config.model.remat=True --config.model.remat_policy=full
part attention probe "$LIMIT_PROBE" "$PYTHON" bench/attention_probe.py "${PROBE[@]}" \
  --json_out="$WORK/attention_probe.json"

"$PYTHON" bench/gpu_report.py summary "$WORK" "$OUT_DIR/gpu_summary.json"
status=$?
echo "total ${SECONDS}s"
exec >&- 2>&-
wait "$TEE_PID"  # gpu.log complete before the device tool collects $OUT
exit $status
