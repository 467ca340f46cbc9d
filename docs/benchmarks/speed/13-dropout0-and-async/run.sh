# Session 14, first device call: the 24 GB guide's method kept with LoRA dropout 0 (PEFT's
# default; the guide names none), seed and planner in the same call; the 8 GB group with
# train.offload_async beside the planner's plan and the seed made to fit; then allocator
# snapshots of the 8 GB plan with and without offload_async, to find where the async plan's
# extra reserved memory sits (scripts/backward_peak_report.py's reserved-by-stream section).
# Run from the project root with .whl carried:
#   bash docs/benchmarks/speed/13-dropout0-and-async/run.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
timeout 480 python3 scripts/benchmark_speed.py --only 24gb-lora-method-kept-dropout0 --only 8gb-qlora --offload-async \
  --skip vramfit-auto-fused --skip seed-as-written-uncapped \
  --results /tmp/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(==|done|prediction)" $OUT/benchmark.log | cut -c1-160
M=/tmp/vramfit-bench
SETS="--set data.seq_len=512 --set lora.r=8 --set lora.alpha=16 --set lora.target_modules=[q_proj,v_proj] --set train.micro_batch=16 --set train.grad_accum=2 --set train.max_steps=3 --set train.save_steps=1000 --set train.logging_steps=1"
for v in true false; do
  rm -rf /tmp/snap-$v
  VRAMFIT_MEMORY_HISTORY=/tmp/snap-$v.pickle timeout 100 python3 -m vramfit train --preset auto --budget 8 --model $M/qwen2.5-7b \
    --data $M/long.jsonl --out /tmp/snap-$v $SETS --set train.offload_async=$v > $OUT/snap-$v.log 2>&1
  python3 scripts/backward_peak_report.py /tmp/snap-$v.pickle --run /tmp/snap-$v --top 12 > $OUT/snap-$v.txt 2>&1
  grep -E "peak_(allocated|reserved)|nvml" /tmp/snap-$v/metrics.json | head -4
  sed -n '/^reserved/,/made it/p' $OUT/snap-$v.txt
done
