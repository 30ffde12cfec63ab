#!/usr/bin/env bash
# Download, here (with the package index), the wheels bench/gpu.sh needs on the GPU image that it
# lacks: Grain and what it needs beyond the image's packages (array-record, portpicker,
# importlib_resources), for the image's Python 3.12 on x86-64. They land in .whl/ (git-ignored);
# pass it along with the run (the device tool's `carry: [".whl"]`), and bench/gpu.sh puts them
# on PYTHONPATH from /tmp/site when Grain is missing there. About 4.5 MB.
#
#     bash bench/gpu_wheels.sh [PYTHON]        # PYTHON: a python with pip (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 importlib_resources==7.1.0
ls -l .whl
