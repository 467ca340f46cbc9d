# Session 19, one device call: the 8 GB group's measurement and the A/B session 18 could not
# run. One H100 or H200; the 8 GB group's command (Qwen2.5-7B QLoRA r8 q/v, seq 512,
# micro-batch 16 x 2, 8 GiB cap, the planner's plan), 12 steps a run:
#   1. beside the model's build, the CUDA test of lean_mlp.py with liger itself;
#   2. the benchmark's 8 GB rows: the planner's plan (this code: the all-ones mask left out,
#      lean_mlp.py's SwiGLU skip), the same with kernels.lean_recompute off (--no-lean; only
#      its MLP part applies here), and with train.offload_embeddings_async on (--embed-async:
#      the lookup from the collator's CPU ids; opt-in until this measures it);
#   3. `before`: the planner's plan with the code of 61bb2aa (.old/src), session 17's measured
#      call (13,494 tokens/s on an H100), to tell this machine from that one;
#   4. `again`: the planner's plan once more with this code, while time is left (the spread).
# .old (git-ignored) is made first: rm -rf .old && mkdir .old && git archive 61bb2aa src | tar -x -C .old
# Run from the project root with .whl and .old carried:
#   bash docs/benchmarks/speed/23-8gb-ab/run.sh
# LIMIT: the seconds the script may take (default 560); BENCH: the benchmark's extra rows
# (default "--no-lean --embed-async"); ARMS: the runs after it (default "before again"). With
# little device time left: LIMIT=430 BENCH=--embed-async ARMS=before.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
NEW=/tmp/site:$PWD/src OLD=/tmp/site:$PWD/.old/src
export PYTHONPATH=$NEW
LIMIT=${LIMIT:-560} BENCH=${BENCH---no-lean --embed-async} ARMS=${ARMS-before again}
set -- $ARMS
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
cat $OUT/host.txt
M=/tmp/vramfit-bench
mkdir -p $M
(python3 scripts/make_random_model.py scripts/archs/qwen2.5-7b.json $M/qwen2.5-7b --device cuda > $OUT/build.log 2>&1
 python3 scripts/make_embedded_dataset.py --n 600 --min-chars 9000 --out $M/long.jsonl >> $OUT/build.log 2>&1) &
BUILD=$!
timeout 90 python3 -m pytest -q -m gpu tests/test_lean_mlp.py -p no:cacheprovider > $OUT/pytest-gpu.log 2>&1
tail -1 $OUT/pytest-gpu.log
wait $BUILD
echo "built at ${SECONDS}s"
timeout $((LIMIT - 80 * $# - SECONDS)) python3 scripts/benchmark_speed.py --only 8gb-qlora --steps 12 $BENCH \
  --skip seed-made-to-fit --skip vramfit-auto-fused --skip seed-as-written-uncapped --skip seed-as-written \
  --results /tmp/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(==|done|prediction)" $OUT/benchmark.log | cut -c1-160
echo "benchmark done at ${SECONDS}s"
CMD="train --preset auto --budget 8 --model $M/qwen2.5-7b --data $M/long.jsonl --set data.seq_len=512 --set lora.r=8 --set lora.alpha=16 --set lora.target_modules=[q_proj,v_proj] --set train.micro_batch=16 --set train.grad_accum=2 --set train.save_steps=1000 --set train.logging_steps=1 --set train.max_steps=12"
mkdir -p /tmp/ab
for v in $ARMS; do
  [ $SECONDS -gt $((LIMIT - 80)) ] && { echo "$v: no time left"; break; }
  P=$NEW; [ $v = before ] && P=$OLD
  rm -rf /tmp/run-$v
  PYTHONPATH=$P timeout $((LIMIT - SECONDS)) python3 -m vramfit $CMD --out /tmp/run-$v > /tmp/ab/$v.log 2>&1
  echo "$v at ${SECONDS}s: $(grep -o '"steady_tokens_per_s": [0-9.]*' /tmp/run-$v/metrics.json) $(grep -o '"peak_process_gib": [0-9.]*' /tmp/run-$v/metrics.json)"
  for f in metrics.json train.log; do cp /tmp/run-$v/$f /tmp/ab/$v-$f 2>/dev/null; done
  tar czf $OUT/ab.tar.gz -C /tmp ab
done
