#!/usr/bin/env bash
# The GPU check in one command, from the repo root of a copy of this tree on a GPU machine
# (bench/gpu_check.py says what it runs; bench/README.md "GPU check" how to read it):
#
#   bash bench/gpu_check.sh              # results in $OUT (default ./gpu_check_out)
#   bash bench/gpu_check.sh --dry-run    # the same code path on CPU, tiny shapes (tests/test_gpu_check.py)
#
# Needs python3 with jax (CUDA), flax, optax, orbax-checkpoint, transformers, torch, peft and
# safetensors; nothing is fetched from the network. Wheels in .whl/ (bench/gpu_wheels.sh makes
# them, e.g. bitsandbytes for PyTorch's QLoRA row) are installed into /tmp first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ftc_wheels .whl/*.whl; then
    export PYTHONPATH="/tmp/ftc_wheels${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "[gpu_check] installing .whl/ failed; going on without those packages"
  fi
fi

# ftc's import name maps ftc/, spec/, compiler/, backends/ and schemas/ (pyproject's package-dir).
# Where ftc is not installed, link the subpackages into ftc/ of this copy of the tree.
if ! "$PY" -c "import ftc.backends.jax, ftc.compiler" 2>/dev/null; then
  for d in spec compiler backends schemas; do [ -e "ftc/$d" ] || ln -s "../$d" "ftc/$d"; done
  "$PY" -c "import ftc.backends.jax, ftc.compiler" || { echo "[gpu_check] cannot import ftc"; exit 2; }
fi

"$PY" -m bench.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
