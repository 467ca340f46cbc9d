# Session 13, first device call: the CUDA tests of fused_lora, StreamCopies and gpu_gaps, then the
# 8 GB group with the two opt-in speed-ups of session 12 beside the planner's plan and the seed
# made to fit (same call, same cap). Run from the project root with .whl carried:
#   bash docs/benchmarks/speed/12-8gb-qlora-fused-async/run.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > $OUT/pytest-gpu.log 2>&1; tail -4 $OUT/pytest-gpu.log
python3 scripts/benchmark_speed.py --only 8gb-qlora --fused-lora --offload-async --skip vramfit-auto-fused \
  --skip seed-as-written-uncapped --results $OUT/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(done|prediction)" $OUT/benchmark.log; tail -12 $OUT/bench/speed.csv | cut -c1-200
