# Session 18, second device call: the A/B the first call (../22-8gb-host-ids/) lost to its
# timeouts (each run's start, loading the 7B and compiling liger's kernels, took 50-60 s
# there, and the runs were cut at step 1-6). One H100 or H200, the 8 GB group's command
# (Qwen2.5-7B QLoRA r8 q/v, seq 512, micro-batch 16 x 2, 8 GiB cap, the planner's plan),
# 8 steps each, in order while time is left:
#   new     this code as it is (the all-ones mask left out; lean_mlp.py's SwiGLU skip)
#   async   this code with train.offload_embeddings_async on (the lookup from the collator's
#           CPU ids, nothing read back from the GPU): opt-in until this measures it
#   nolean  this code with kernels.lean_recompute off (only its MLP part applies here)
#   before  the code of 61bb2aa (.old/src), session 17's measured call
# and first, beside the model's build, the CUDA test of lean_mlp.py with liger itself.
# .old (git-ignored) is made first: mkdir .old && git archive 61bb2aa src | tar -x -C .old
# Run from the project root with .whl and .old carried:
#   bash docs/benchmarks/speed/23-8gb-ab/run.sh
# ARMS picks the runs (default all four, in the order above), LIMIT the seconds the script
# may take (default 420): with little device time left, ARMS=new LIMIT=200.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
NEW=/tmp/site:$PWD/src OLD=/tmp/site:$PWD/.old/src
export PYTHONPATH=$NEW
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
cat $OUT/host.txt
M=/tmp/vramfit-bench
mkdir -p $M
(python3 scripts/make_random_model.py scripts/archs/qwen2.5-7b.json $M/qwen2.5-7b --device cuda > $OUT/build.log 2>&1
 python3 scripts/make_embedded_dataset.py --n 600 --min-chars 9000 --out $M/long.jsonl >> $OUT/build.log 2>&1) &
BUILD=$!
timeout 60 python3 -m pytest -q -m gpu tests/test_lean_mlp.py -p no:cacheprovider > $OUT/pytest-gpu.log 2>&1
tail -1 $OUT/pytest-gpu.log
wait $BUILD
echo "built at ${SECONDS}s"
CMD="train --preset auto --budget 8 --model $M/qwen2.5-7b --data $M/long.jsonl --set data.seq_len=512 --set lora.r=8 --set lora.alpha=16 --set lora.target_modules=[q_proj,v_proj] --set train.micro_batch=16 --set train.grad_accum=2 --set train.save_steps=1000 --set train.logging_steps=1 --set train.max_steps=8"
mkdir -p /tmp/ab
LIMIT=${LIMIT:-420}
for v in ${ARMS:-new async nolean before}; do
  [ $SECONDS -gt $((LIMIT - 90)) ] && { echo "$v: no time left"; break; }
  X=""; P=$NEW
  case $v in
    before) P=$OLD;;
    async) X="--set train.offload_embeddings_async=true";;
    nolean) X="--set kernels.lean_recompute=false";;
  esac
  rm -rf /tmp/run-$v
  PYTHONPATH=$P timeout $((LIMIT - SECONDS)) python3 -m vramfit $CMD $X --out /tmp/run-$v > /tmp/ab/$v.log 2>&1
  echo "$v at ${SECONDS}s: $(grep -o '"steady_tokens_per_s": [0-9.]*' /tmp/run-$v/metrics.json) $(grep -o '"peak_process_gib": [0-9.]*' /tmp/run-$v/metrics.json)"
  for f in metrics.json train.log; do cp /tmp/run-$v/$f /tmp/ab/$v-$f 2>/dev/null; done
  tar czf $OUT/ab.tar.gz -C /tmp ab
done
