#!/usr/bin/env bash
# The GPU check of the recorder (issue 11, item 4) as one prepared script for a lent device
# machine (the `device` tool: one H200 for 15 minutes in all, Python 3.12 with PyTorch, no
# network). Run from the repository root, after `bash benchmarks/fetch_device_wheels.sh` here:
#
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"], timeout_s=600)
#
# The steps' own time limits (TESTS_S, PAPER_S, BENCH_S, CONV_S: 200 + 120 + 200 + 60 s) add up
# to less than one call may run (600 s).
# 1. installs the packages trajlab needs that the machine's image lacks, from the wheels in
#    .whl/, into /tmp/site;
# 2. the CUDA tests (pytest -m cuda: tests/test_devices.py, tests/test_staging.py,
#    tests/test_recorder.py);
# 3. benchmarks/paper_scale.py --device cuda --quick --skip-analysis: the paper ConvNet at
#    B=128 and 256, every=1 and every=10, against plain steps, and the recording hours of the
#    paper's runs (Fig. 2: 30,000 steps; Fig. 3: 344,370) projected on this GPU (issue 26 item 5;
#    the analysis runs on CPUs, measured here by the same script without --device);
# 4. benchmarks/record_overhead.py --device cuda --quick on the paper-style ConvNet, the MLP
#    and the digits ConvNet, thread writer;
# 5. benchmarks/conv_per_sample.py --device cuda --quick (which way of forming a conv layer's
#    per-sample gradients is faster on the GPU: trajlab uses im2col there until measured).
# Logs go to $OUT (the device tool's folder that comes back) or out/device. On a machine
# without a GPU, `DEVICE=cpu MODELS=convnet PAPER_ARGS="--batch 16" bash
# benchmarks/device_check.sh` runs the same steps (the CUDA tests are then skipped).
set -uo pipefail
out=${OUT:-out/device}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{
    date -u
    nvidia-smi 2>/dev/null || echo "(no nvidia-smi)"
    "$py" -c "import torch, zarr, dask, trajlab; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), 'zarr', zarr.__version__, 'dask', dask.__version__, 'trajlab',
trajlab.__version__)"
} 2>&1 | tee "$out/env.txt"
timeout "${TESTS_S:-200}" "$py" -m pytest -q -m cuda -p no:cacheprovider \
    tests/test_devices.py tests/test_staging.py tests/test_recorder.py 2>&1 \
    | tee "$out/cuda_tests.log"
timeout "${PAPER_S:-120}" "$py" benchmarks/paper_scale.py --device "${DEVICE:-cuda}" --quick \
    --skip-analysis ${PAPER_ARGS:-} 2>&1 | tee "$out/paper_scale.log"
timeout "${BENCH_S:-200}" "$py" benchmarks/record_overhead.py --device "${DEVICE:-cuda}" \
    --quick --writer thread --bandwidth-gb 1 ${MODELS:+--models "$MODELS"} 2>&1 \
    | tee "$out/record_overhead.log"
timeout "${CONV_S:-60}" "$py" benchmarks/conv_per_sample.py --device "${DEVICE:-cuda}" --quick \
    --batch 128 2>&1 | tee "$out/conv_per_sample.log"
