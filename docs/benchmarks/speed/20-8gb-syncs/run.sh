# Session 17, first device call, one machine. The 8 GB group (Qwen2.5-7B QLoRA r8 q/v, seq 512,
# effective batch 32, 8 GiB cap) after removing CPU waits on the GPU that session 16's profile
# pointed at (the Trainer's per-micro-batch NaN check, the FLOPs count's model walk, a
# single-threaded embedding gather):
#   1. CUDA tests: the overlapped lookup, now with its gather split over threads;
#   2. the benchmark: the seed made to fit, the planner's plan, and the plan with
#      train.offload_embeddings_async (this code);
#   3. the planner's plan with the code before this session (.old/src, commit b3a1495);
#   4. VRAMFIT_PROFILE of the overlapped plan, now with where the CPU waited (syncs_per_step).
# Run from the project root with .whl and .old carried:
#   bash docs/benchmarks/speed/20-8gb-syncs/run.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
NEW=/tmp/site:$PWD/src OLD=/tmp/site:$PWD/.old/src
export PYTHONPATH=$NEW
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
cat $OUT/host.txt
timeout 60 python3 -m pytest -q -m gpu tests/test_memory_savers.py -p no:cacheprovider > $OUT/pytest-gpu.log 2>&1
tail -2 $OUT/pytest-gpu.log
timeout 300 python3 scripts/benchmark_speed.py --only 8gb-qlora --steps 8 --embed-async --skip vramfit-auto-fused \
  --skip seed-as-written-uncapped --skip seed-as-written \
  --results /tmp/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(==|done|prediction)" $OUT/benchmark.log | cut -c1-160
M=/tmp/vramfit-bench
CMD="train --preset auto --budget 8 --model $M/qwen2.5-7b --data $M/long.jsonl --set data.seq_len=512 --set lora.r=8 --set lora.alpha=16 --set lora.target_modules=[q_proj,v_proj] --set train.micro_batch=16 --set train.grad_accum=2 --set train.save_steps=1000 --set train.logging_steps=1"
mkdir -p /tmp/ab
rm -rf /tmp/run-before
PYTHONPATH=$OLD timeout 65 python3 -m vramfit $CMD --set train.max_steps=10 --out /tmp/run-before > /tmp/ab/before.log 2>&1
echo "before: $(grep -E '^(done|prediction)' /tmp/ab/before.log | cut -c1-120 | tr '\n' ' ')"
for f in metrics.json train.log; do cp /tmp/run-before/$f /tmp/ab/before-$f 2>/dev/null; done
tar czf $OUT/ab.tar.gz -C /tmp ab
rm -rf /tmp/run-prof
VRAMFIT_PROFILE=$OUT/profile-8gb.txt timeout 120 python3 -m vramfit $CMD --set train.max_steps=8 \
  --set train.offload_embeddings_async=true --out /tmp/run-prof > $OUT/profile-train.log 2>&1
tail -2 $OUT/profile-train.log | cut -c1-160
grep -A20 syncs_per_step $OUT/profile-8gb.txt | cut -c1-220
