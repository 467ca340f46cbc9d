# Session 16, second device call, step 1 of speed-checks/19-8gb-step-gaps/run.sh (that script
# ran this and then the 8 GB A/B on the same machine): the 24 GB guide's method-kept group with
# LoRA dropout 0, the seed as written and the planner's own plan as it now stands, one call.
# Run from the project root with .whl carried:
#   bash docs/benchmarks/speed/18-24gb-dropout0-auto/run.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
timeout 250 python3 scripts/benchmark_speed.py --only 24gb-lora-method-kept-dropout0 --steps 10 \
  --skip vramfit-auto-fused --skip seed-as-written-uncapped \
  --results /tmp/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(==|done|prediction)" $OUT/benchmark.log | cut -c1-160
