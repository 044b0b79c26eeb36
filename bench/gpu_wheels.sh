#!/usr/bin/env bash
# Builds .whl/ on this (CPU) machine: every wheel bench/gpu.sh installs on the GPU machine, which reaches no package
# registry. They are setup.py's requirements that the GPU image lacks, and what those need, at the versions installed
# here (the ones the tests pass with), for the image's python (3.12) on x86-64:
#   ml-collections, tensorboardX, rouge-score (built here: PyPI has only its sdist), nltk and defusedxml (rouge-score's)
# The image brings the rest (flax, optax, orbax-checkpoint, sentencepiece, tokenizers, absl-py, numpy, tqdm,
# matplotlib, safetensors, ml-dtypes, pyyaml, pytest, hypothesis: /work/.library/device/KINDS.md's list). It brings
# jax too (0.11.2 with jaxlib and jax-cuda13-plugin/pjrt 0.11.2, as a session saw it in 2026-11), and jax's CUDA
# wheels could not travel anyway: a call carries 64 MiB in all, the working tree included, and jaxlib alone is 81 MiB,
# nvidia-cudnn-cu13 527 MiB, nvidia-cublas 404 MiB. gpu.sh checks the image's jax against setup.py's minimum instead.
#
#   bash bench/gpu_wheels.sh          # then carry it: the device tool's run(..., carry=[".whl"])
#
# Environment: PY (the GPU machine's python, 3.12), WHEELS (the folder, .whl; git-ignored by .gitignore).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-3.12}
WHEELS=${WHEELS:-.whl}
PACKAGES=(ml-collections tensorboardX rouge-score nltk defusedxml)
LIMIT_MIB=64

if ! git check-ignore -q "$WHEELS/x.whl"; then
  echo "error: $WHEELS is not git-ignored: add /$WHEELS/ to .gitignore (it travels through carry, not git)" >&2
  exit 1
fi
mkdir -p "$WHEELS"
rm -f "$WHEELS"/*.whl  # one version of each: two stop the whole install there
for name in "${PACKAGES[@]}"; do
  version=$(python3 -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$name") || {
    echo "error: $name is not installed here: pip install -e \".[test]\" first (its version is the one to carry)" >&2
    exit 1
  }
  if ! python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "$name==$version" 2>/dev/null; then
    echo "$name $version: no wheel published; building one here"
    python3 -m pip wheel -q --no-deps -w "$WHEELS" "$name==$version"
  fi
done

# Each wheel must install on the GPU machine: pure Python, or built for its python and x86-64.
for wheel in "$WHEELS"/*.whl; do
  tags=$(basename "$wheel" .whl | rev | cut -d- -f1-3 | rev)
  if ! [[ $tags == py3-none-any || $tags == py2.py3-none-any || $tags == cp${PY/./}-*x86_64* ]]; then
    echo "error: $wheel ($tags) will not install on python $PY x86-64" >&2
    exit 1
  fi
done
python3 -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: --python-version "$PY" \
  --implementation cp --platform manylinux2014_x86_64 --target "$(mktemp -d)" "$WHEELS"/*.whl

wheels_kib=$(du -ck "$WHEELS"/*.whl | tail -1 | cut -f1)
tree_kib=$(git ls-files -z -co --exclude-standard | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
ls -l "$WHEELS"/*.whl
echo "$WHEELS: $((wheels_kib)) KiB of wheels + $((tree_kib)) KiB of working tree, against ${LIMIT_MIB} MiB a call"
if ((wheels_kib + tree_kib > LIMIT_MIB * 1024)); then
  echo "error: over the device tool's ${LIMIT_MIB} MiB: the call would be refused" >&2
  exit 1
fi
