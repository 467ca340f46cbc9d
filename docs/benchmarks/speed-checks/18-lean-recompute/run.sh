# Session 15, first device call: kernels.lean_recompute (a checkpointed layer's recomputation
# leaves out down_proj's base multiply) on the 24 GB guide's method-kept plan (16-bit LoRA r128
# all-linear, seq 1536, effective batch 16, LoRA dropout 0), all on one machine:
#   1. the CUDA tests of fused_lora.py;
#   2. the planner's own plan through the benchmark (with lean recompute it now plans
#      micro-batch 8 x 2 with the layer inputs in host RAM);
#   3. the same command run directly: session 14's plan (lean recompute off, so 4 x 4 with the
#      first 24 layers recomputed), that split with it on, and 8 x 2 with the copies async.
# Run from the project root with .whl carried:
#   bash docs/benchmarks/speed-checks/18-lean-recompute/run.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_fused_lora.py > $OUT/pytest.log 2>&1; tail -1 $OUT/pytest.log
timeout 230 python3 scripts/benchmark_speed.py --only 24gb-lora-method-kept-dropout0 --steps 10 \
  --skip vramfit-auto-fused --skip seed-as-written --skip seed-as-written-uncapped --skip seed-made-to-fit \
  --results /tmp/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(==|done|prediction)" $OUT/benchmark.log | cut -c1-160
M=/tmp/vramfit-bench
CMD="train --preset auto --budget 24 --model $M/qwen2.5-7b --data $M/long.jsonl --set data.seq_len=1536 --set lora.r=128 --set lora.dropout=0.0 --set lora.target_modules=all-linear --set train.lr=0.0001 --set method=lora --set train.max_steps=10 --set train.save_steps=1000 --set train.logging_steps=1"
mkdir -p /tmp/direct
for v in mb4-lean-off mb4-lean-on mb8-async-lean-on; do
  case $v in
    mb4-lean-off) X="--set kernels.lean_recompute=false" ;;
    mb4-lean-on) X="--set train.micro_batch=4 --set train.grad_accum=4" ;;
    mb8-async-lean-on) X="--set train.micro_batch=8 --set train.grad_accum=2 --set train.offload_activations=true --set train.offload_async=true" ;;
  esac
  rm -rf /tmp/run-$v
  timeout 100 python3 -m vramfit $CMD $X --out /tmp/run-$v > /tmp/direct/$v.log 2>&1
  echo "$v: $(grep -o '[0-9,]* tok/s' /tmp/direct/$v.log | tr '\n' ' ')"
  for f in metrics.json plan.yaml train.log; do cp /tmp/run-$v/$f /tmp/direct/$v-$f 2>/dev/null; done
  tar czf $OUT/direct.tar.gz -C /tmp direct
done
