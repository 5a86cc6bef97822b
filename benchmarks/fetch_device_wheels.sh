#!/usr/bin/env bash
# Download (here, where pip reaches the package index) the wheels that
# benchmarks/device_check.sh installs on the GPU machine: Python 3.12, x86-64, only the
# packages trajlab needs that the machine's image lacks (its list:
# ../.library/device/KINDS.md). About 13 MB into .whl/ (git-ignored; the device tool's
# `carry` takes it along).
set -euo pipefail
dest=${1:-.whl}
mkdir -p "$dest"
${PYTHON:-python3} -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 -d "$dest" \
    "zarr>=3.0.8,<4" "numcodecs>=0.16.6,!=0.17.0" "crc32c>=2.4" google-crc32c msgspec donfig \
    "dask>=2024.8" "distributed>=2024.8" partd locket zict "tblib!=3.2.0,!=3.2.1" tornado
ls "$dest"
