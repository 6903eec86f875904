#!/usr/bin/env bash
# The GPU check, on a machine with one CUDA GPU (about 5 minutes on an H100/H200-class GPU):
#   1. the test suite's CUDA cases (every test parametrised by device, plus the CUDA-only ones);
#   2. one training step, plain vs partial JD (vs TorchJD where installed and B <= 256), with peak
#      memory, on: MLP 784-1024-1024-10 at B=128 and B=1024 (last two layers considered),
#      ViT-B/16 224 px at B=64 in fp32 and at B=256 under bf16 autocast (last block + norm +
#      head), ResNet-50 224 px at B=256 (fc);
#   3. UPGrad alone at m = 16, 128, 1024, 4096: default choice, lock-step path, host copy.
# Run from anywhere: bash tests/benchmarks/gpu_check.sh  (exit status: that of the tests)
set -uo pipefail
cd "$(dirname "$0")/../.."
python - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "gpu_check.sh needs a CUDA device"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
PY
echo "== 1. CUDA tests"
timeout 180 python -m pytest -q -p no:cacheprovider -k "cuda" -m "not slow" tests
status=$?
echo "== 2. one training step (10 interleaved rounds, medians)"
timeout 150 python tests/benchmarks/bench_step.py --device cuda --rounds 10
echo "== 3. UPGrad weights"
timeout 60 python tests/benchmarks/bench_weighting.py --device cuda --repeats 5
exit $status
