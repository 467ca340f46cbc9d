# Session 16, first device call. On the 8 GB group (Qwen2.5-7B QLoRA r8 q/v, seq 512, effective
# batch 32, 8 GiB cap):
#   1. the CUDA tests written in session 15 and never run (lean recompute, overlapped lookup);
#   2. the seed made to fit, the planner's plan, and the plan with the opt-in overlapped
#      embedding lookup (train.offload_embeddings_async), one machine;
#   3. the planner's plan under VRAMFIT_PROFILE: where its step time goes.
# Run from the project root with .whl carried:
#   bash docs/benchmarks/speed/17-8gb-embed-async-profile/run.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
cat $OUT/host.txt
timeout 150 python3 -m pytest -q -m gpu tests/test_memory_savers.py tests/test_fused_lora.py -p no:cacheprovider > $OUT/pytest-gpu.log 2>&1
tail -3 $OUT/pytest-gpu.log
timeout 300 python3 scripts/benchmark_speed.py --only 8gb-qlora --embed-async --steps 8 --skip vramfit-auto-fused \
  --skip seed-as-written-uncapped --skip seed-as-written --results /tmp/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(==|done|prediction)" $OUT/benchmark.log | cut -c1-160
M=/tmp/vramfit-bench
rm -rf /tmp/run-prof
VRAMFIT_PROFILE=$OUT/profile-8gb.txt timeout 120 python3 -m vramfit train --preset auto --budget 8 --model $M/qwen2.5-7b \
  --data $M/long.jsonl --out /tmp/run-prof --set data.seq_len=512 --set lora.r=8 --set lora.alpha=16 \
  --set 'lora.target_modules=[q_proj,v_proj]' --set train.micro_batch=16 --set train.grad_accum=2 \
  --set train.max_steps=8 --set train.save_steps=1000 --set train.logging_steps=1 > $OUT/profile-train.log 2>&1
tail -4 $OUT/profile-train.log | cut -c1-160
