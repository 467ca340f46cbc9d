# Session 14, second device call: the planner's plans with 10 steps each (less step noise than
# 6), beside the same plans with the checkpointed layer inputs in host RAM copied on a stream of
# their own (train.offload_activations and train.offload_async pinned; for the 24 GB guide's
# method kept with LoRA dropout 0 that gives micro-batch 8 x 2, a second shape for
# memory.OFFLOAD_ASYNC_RESERVE_INPUTS). metrics.json now records the allocator's reserved bytes
# by stream and its fragmentation peak. The seeds were measured in call 1 (13-dropout0-and-async)
# on an H100 too; they are skipped here to fit the call.
# Run from the project root with .whl carried:
#   bash docs/benchmarks/speed/14-dropout0-async-mb8/run.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
timeout 540 python3 scripts/benchmark_speed.py --only 24gb-lora-method-kept-dropout0 --only 8gb-qlora --offload-async --steps 10 \
  --skip vramfit-auto-fused --skip seed-as-written --skip seed-as-written-uncapped --skip seed-made-to-fit \
  --results /tmp/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(==|done|prediction)" $OUT/benchmark.log | cut -c1-160
grep -h -A3 -E "reserved_by_stream|inactive_split" /tmp/bench/runs/*/metrics.json
