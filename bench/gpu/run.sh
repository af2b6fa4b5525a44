#!/usr/bin/env bash
# The GPU checks, as one prepared run on a lent GPU machine (16 cores, one H200):
#
#   bash bench/gpu/stage.sh                                    # once, here (see that file)
#   # then, through the device tool, from the repository root, carrying .gpu:
#   bash bench/gpu/run.sh                                      # ~8 minutes; results land in $OUT
#
# 1. the GPU tests: bf16 agrees with fp32, tiles blend, a replica's PNG threads, Ray Data on
#    GPU replicas, peak device memory bounded by the tile (tests/test_gpu.py);
# 2. the restore benchmark with DnCNN-S in bf16, 100x BSD68 on local disk: forward pass,
#    plain loop, the pipeline (GPU busy sampled through NVML), one file against many, and
#    where a replica's time goes (stage seconds);
# 3. the forward pass alone at 4-64 rows per call.
# Results: $OUT/restore_gpu_scale100.json, $OUT/gpu_tests.log, $OUT/bench.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/resflow-gpu-out}
mkdir -p "$OUT" /tmp/site
zstd -q -d -c .gpu/site.tar.zst | tar -C /tmp -xf -
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RESFLOW_SHARED_DATA=${RESFLOW_SHARED_DATA:-$PWD/.gpu/data}
export ARROW_DEFAULT_MEMORY_POOL=system RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/gpu_tests.log"
timeout 420 python3 -m bench.restore_bench --preset dncnn-paper --scale 100 --storage local --dir /tmp/bench \
    2>&1 | grep -v "^20[0-9][0-9]-" | tail -40 | tee "$OUT/bench.log"
cp bench/results/restore_gpu_scale100.json "$OUT/" 2>/dev/null || true
