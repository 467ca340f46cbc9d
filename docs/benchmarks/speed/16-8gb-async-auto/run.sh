# Session 15, second device call. Auto-fit now chooses train.offload_async where it pays and
# fits (speed.ASYNC_HIDDEN_S_PER_GB, memory.OFFLOAD_ASYNC_RESERVE_INPUTS):
#   1. the 8 GB group: the seed refused as written, the seed made to fit, and the planner's
#      own plan (now with the copies async), in one call;
#   2. the allocator's async reserve on a long single sequence (Qwen2.5-7B QLoRA r8 q/v under
#      8 GiB, seq 8192, micro-batch 1, inputs in host RAM), async on and off: the reserve term
#      was fitted on micro-batches of 16 x 512 and 8 x 1536.
# Run from the project root with .whl carried:
#   bash docs/benchmarks/speed/16-8gb-async-auto/run.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
timeout 330 python3 scripts/benchmark_speed.py --only 8gb-qlora --steps 8 --skip vramfit-auto-fused --skip seed-as-written-uncapped \
  --results /tmp/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(==|done|prediction)" $OUT/benchmark.log | cut -c1-160
M=/tmp/vramfit-bench
python3 scripts/make_embedded_dataset.py --n 8 --min-chars 8704 --out /tmp/ctx.jsonl > /dev/null
mkdir -p /tmp/long
for A in true false; do
  rm -rf /tmp/run-long-$A
  timeout 100 python3 -m vramfit train --preset auto --budget 8 --model $M/qwen2.5-7b --data /tmp/ctx.jsonl --out /tmp/run-long-$A \
    --set method=qlora --set lora.r=8 --set lora.alpha=16 --set 'lora.target_modules=[q_proj,v_proj]' --set data.seq_len=8192 \
    --set train.micro_batch=1 --set train.grad_accum=1 --set train.grad_ckpt=true --set train.offload_activations=true \
    --set train.offload_async=$A --set train.max_steps=4 --set train.save_steps=1000 --set train.logging_steps=1 > /tmp/long/async-$A.log 2>&1
  echo "async=$A: $(grep -o 'process [0-9.]*' /tmp/long/async-$A.log | tail -1) $(grep -o 'predicted peak[^;,]*' /tmp/long/async-$A.log | head -1)"
  for f in metrics.json plan.yaml train.log; do cp /tmp/run-long-$A/$f /tmp/long/async-$A-$f 2>/dev/null; done
  tar czf $OUT/long.tar.gz -C /tmp long
done
