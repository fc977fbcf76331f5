#!/usr/bin/env bash
# Wheels for the GPU machine (Python 3.12, x86-64, no network there): the packages ftc's runtime
# needs that its image lacks, so that `bash bench/gpu_check.sh` (which installs .whl/*.whl first)
# and `ftc run` work there. Run once here, from the repo root, where pip reaches PyPI:
#
#   bash bench/gpu_wheels.sh                    # .whl/: grain, tensorflow-datasets, gguf, tensorboardX, jsonschema
#   bash bench/gpu_wheels.sh bitsandbytes       # also PyTorch's QLoRA row (large: checks the 64 MiB a call carries)
#
# Versions are the ones this checkout's .venv runs (PYTHON=... to read another environment), so
# the GPU machine runs what the tests here ran. Only what the image lacks is fetched
# (/work/.library/device/KINDS.md lists what it has: numpy, protobuf, pyarrow, absl-py, etils, ...).
# The device call then names `.whl` in carry; .whl/ is kept out of git by .git/info/exclude.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
# The five packages and what each needs beyond the image (pip show's Requires, less the image's).
PACKAGES=(grain array_record dm-tree tensorflow-datasets immutabledict promise simple_parsing docstring_parser
  tensorflow-metadata googleapis-common-protos termcolor toml gguf tensorboardX jsonschema
  jsonschema-specifications referencing rpds-py "$@")
LIMIT_MIB=60

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>"$(git rev-parse --git-path info/exclude)"
mkdir -p .whl
PLATFORMS=()
for p in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
  manylinux_2_17 manylinux2014 manylinux1; do PLATFORMS+=(--platform "${p}_x86_64"); done
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
  spec="$name${version:+==$version}"
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec" 2>/dev/null; then
    # A pure-Python package published only as a source archive (promise): build its wheel here.
    "$PY" -m pip wheel -q --no-deps --no-binary "$name" -w .whl "$spec"
  fi
done
size=$(du -sm .whl | cut -f1)
ls -1 .whl
echo "[gpu_wheels] .whl/ holds ${size} MiB (a device call carries 64 MiB with the tree)"
if [ "$size" -gt "$LIMIT_MIB" ]; then
  echo "[gpu_wheels] too large to carry: drop the largest wheels (ls -S .whl)" >&2
  exit 1
fi
