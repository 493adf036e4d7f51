#!/usr/bin/env bash
# Everything anypool needs a GPU for, in one script: run from the repository root on a
# machine with an NVIDIA GPU, PyTorch (CUDA build) and Triton.  Nothing is installed.
#
#   bash benchmarks/gpu_run.sh [all|tests|bench|sweep]      (default: all = tests + bench)
#
# Logs and JSON go to $OUT (default ./gpu_out).  Each stage fits in well under 10 minutes
# on an H100, so a device session can run `tests` and `bench` as separate commands.
#   tests  the Triton kernel tests compiled for the GPU (tests/triton without the
#          interpreter: every variant vs the NumPy reference, 400 harness cases with
#          gradients, PyTorch's native CUDA op, bitwise-deterministic backward, > 2**31
#          elements, the public API under use_deterministic_algorithms and torch.compile),
#          plus the torch backend's own tests when they exist
#   bench  benchmarks/triton_bench.py (kernels vs native CUDA, copy bandwidth) and
#          `anypool bench --device cuda --framework torch`
#   sweep  tile-size / warp-count sweep of the kernels on the large cases
set -u
stage=${1:-all}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
status=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  "$PY" - <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| triton", triton.__version__,
      "| cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "| SMs", p.multi_processor_count, "| memory GiB", round(p.total_memory / 2**30, 1))
else:
    print("NO CUDA DEVICE VISIBLE")
EOF
} 2>&1 | tee "$OUT/env.txt"

if [ "$stage" = all ] || [ "$stage" = tests ]; then
  echo "== tests/triton (compiled, on the GPU)"
  "$PY" -m pytest -q -p no:cacheprovider -rs --durations=10 tests/triton 2>&1 | tee "$OUT/pytest_triton.log"
  status=$(( status | ${PIPESTATUS[0]} ))
  if [ -d tests/torch ]; then
    echo "== tests/torch"
    "$PY" -m pytest -q -p no:cacheprovider -rs tests/torch 2>&1 | tee "$OUT/pytest_torch.log"
    status=$(( status | ${PIPESTATUS[0]} ))
  fi
fi

if [ "$stage" = all ] || [ "$stage" = bench ]; then
  echo "== benchmarks/triton_bench.py"
  "$PY" benchmarks/triton_bench.py --json "$OUT/triton_bench.json" 2>&1 | tee "$OUT/triton_bench.log"
  status=$(( status | ${PIPESTATUS[0]} ))
  echo "== anypool bench --device cuda"
  "$PY" -m anypool.cli bench --device cuda --framework torch --repeats 20 --json "$OUT/bench_cuda.json" \
    2>&1 | tee "$OUT/bench_cuda.log"
  status=$(( status | ${PIPESTATUS[0]} ))
fi

if [ "$stage" = sweep ]; then
  echo "== tile sweep"
  "$PY" benchmarks/triton_bench.py --sweep --json "$OUT/triton_sweep.json" 2>&1 | tee "$OUT/triton_sweep.log"
  status=$(( status | ${PIPESTATUS[0]} ))
fi

echo "gpu_run.sh $stage: exit status $status (logs in $OUT)"
exit $status
