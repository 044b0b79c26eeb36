#!/usr/bin/env bash
# One check of a GPU machine, under 8 minutes on one H200: the device and jax version, a few model tests run on the
# GPU, then GPT-2 small (124M, configs/gpt2_small.py: bf16 compute, length 1024) training throughput with its MFU
# against the device's dense bf16 peak (the vendor's for a kind in train/hardware.DATASHEET_BF16, else the bf16
# matmul peak measured in the same process).
#
#   bash bench/gpu.sh            # on the GPU machine, from the repository root
#   bash bench/gpu.sh --dry      # the same path on CPU with a tiny model (a check of the script itself)
#
# Packages the GPU image lacks (ml-collections, tensorboardX) are installed from wheels in .whl/ (ignored by git;
# carry it to the machine): python3 -m pip download --no-deps -d .whl ml-collections==1.1.0 tensorboardX
# Figures go to $OUT (or /tmp): gpt2_small_throughput.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp}
DRY=0
[[ "${1:-}" == "--dry" ]] && DRY=1

if ! "$PYTHON" -c "import ml_collections, tensorboardX" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/ablax_site --find-links .whl \
      ml-collections tensorboardX
  export PYTHONPATH=/tmp/ablax_site${PYTHONPATH:+:$PYTHONPATH}
fi

if [[ $DRY == 1 ]]; then
  export JAX_PLATFORMS=cpu
  TESTS="decoder_matches_numpy_reference"
  BENCH=(--config.model.num_layers=2 --config.model.d_model=128 --config.model.num_heads=2 --config.train.seq_len=128
         --config.model.max_len=128 --config.train.batch_size=2 --steps=2 --warmup=1)
else
  export JAX_PLATFORMS=cuda
  TESTS="causality_values or decoder_matches_numpy_reference or remat_matches_no_remat or gqa_equals_mha"
  BENCH=(--config.train.batch_size=32 --steps=20 --warmup=3)
fi

echo "== device"
"$PYTHON" -c "import jax; d = jax.devices()[0]; print(f'jax {jax.__version__}, {jax.device_count()} x {d.device_kind} ({jax.default_backend()})')"
[[ $DRY == 1 ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== smoke tests on $JAX_PLATFORMS"
# Float32 matmuls at full precision, so the tests' float32 tolerances hold on tensor cores too.
JAX_DEFAULT_MATMUL_PRECISION=highest "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_model.py -k "$TESTS"

echo "== GPT-2 small throughput (bf16 compute, length 1024)"
JSON="$OUT_DIR/gpt2_small_throughput.json"
# GPT-2's vocabulary padded to a multiple of 64, as nanoGPT does.
"$PYTHON" bench/throughput.py --config=configs/gpt2_small.py --vocab_size=50304 "${BENCH[@]}" --json_out="$JSON"

"$PYTHON" - "$JSON" <<'EOF'
import json
import sys

figures = json.load(open(sys.argv[1]))
kind = figures["config"]["device_kind"]
if "datasheet_bf16_tflops_per_s" in figures:
  peak, source = figures["datasheet_bf16_tflops_per_s"], f"the datasheet dense bf16 peak of {kind}"
else:
  peak = figures["peak_bf16_matmul_gflops_per_s"] / 1e3
  source = f"the bf16 matmul peak measured here ({kind} has no datasheet entry in train/hardware.py)"
print(f"== MFU {figures['model_tflops_per_s'] / peak:.1%}: {figures['model_tflops_per_s']:.3g} model TFLOP/s "
      f"({figures['tokens_per_s']:,.0f} tokens/s, {figures['ms_per_step_median']:.1f} ms/step) against {peak:.3g} "
      f"TFLOP/s, {source}; against the measured bf16 matmul peak: {figures['mfu_bf16']:.1%}")
EOF
