# Session 14, third device call: does gc.freeze() before training (train._freeze_setup_objects)
# remove the slow step in four of the 24 GB guide's method-kept plan (dropout 0, micro-batch
# 4 x 4; steps 5 and 9 ran ~12% slow in calls 1 and 2)? The planner's plan through the
# benchmark (with the freeze), then the same command twice directly: without the freeze (a
# sitecustomize that makes gc.freeze a no-op) and with it again, on the same machine.
# Run from the project root with .whl carried:
#   bash docs/benchmarks/speed/15-gc-freeze/run.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
timeout 200 python3 scripts/benchmark_speed.py --only 24gb-lora-method-kept-dropout0 --steps 10 \
  --skip vramfit-auto-fused --skip seed-as-written --skip seed-as-written-uncapped --skip seed-made-to-fit \
  --results /tmp/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(==|done|prediction)" $OUT/benchmark.log | cut -c1-160
mkdir -p /tmp/nofreeze && echo 'import gc; gc.freeze = lambda: None' > /tmp/nofreeze/sitecustomize.py
M=/tmp/vramfit-bench
CMD="train --preset auto --budget 24 --model $M/qwen2.5-7b --data $M/long.jsonl --set data.seq_len=1536 --set lora.r=128 --set lora.dropout=0.0 --set lora.target_modules=all-linear --set train.lr=0.0001 --set method=lora --set train.max_steps=10 --set train.save_steps=1000 --set train.logging_steps=1"
for v in nofreeze freeze; do
  rm -rf /tmp/run-$v
  if [ $v = nofreeze ]; then PP=/tmp/nofreeze:$PYTHONPATH; else PP=$PYTHONPATH; fi
  PYTHONPATH=$PP timeout 110 python3 -m vramfit $CMD --out /tmp/run-$v > $OUT/train-$v.log 2>&1
  echo "$v: $(grep -o '[0-9,]* tok/s' $OUT/train-$v.log | tr '\n' ' ')"
  cp /tmp/run-$v/metrics.json $OUT/metrics-$v.json 2>/dev/null
done
