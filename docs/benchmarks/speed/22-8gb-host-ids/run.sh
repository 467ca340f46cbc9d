# Session 18, one device call. The 8 GB group (Qwen2.5-7B QLoRA r8 q/v, seq 512, effective
# batch 32, 8 GiB cap) with three changes since session 17's measured call (commit 61bb2aa):
#   - the all-ones attention mask left out (data.Collator; unmeasured in session 17);
#   - the host-RAM embedding lookup takes the collator's CPU ids (data.HOST_IDS_KEY), so
#     nothing is read back from the GPU at the start of a forward, and the overlapped lookup
#     (train.offload_embeddings_async) is on by default;
#   - kernels.lean_recompute's MLP part (lean_mlp.py): recomputations skip liger's SwiGLU
#     kernel before the unadapted 4-bit down_proj.
# In order of need, each step's results saved before the next:
#   1. the CUDA tests of the lookup and of the lean MLP;
#   2. the benchmark: the planner's plan (this code);
#   3. the same command, alternating while time is left (10 steps each): this code with
#      kernels.lean_recompute off ("nolean": only the MLP part applies to this plan), with
#      train.offload_embeddings_async off ("sync"), this code again ("new"), and the code of
#      61bb2aa ("before", .old/src);
#   4. VRAMFIT_PROFILE of the planner's plan, if time is left.
# .old (git-ignored) is made first: mkdir .old && git archive 61bb2aa src | tar -x -C .old
# Run from the project root with .whl and .old carried:
#   bash docs/benchmarks/speed/22-8gb-host-ids/run.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
NEW=/tmp/site:$PWD/src OLD=/tmp/site:$PWD/.old/src
export PYTHONPATH=$NEW
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
cat $OUT/host.txt
timeout 60 python3 -m pytest -q -m gpu tests/test_memory_savers.py tests/test_lean_mlp.py -p no:cacheprovider > $OUT/pytest-gpu.log 2>&1
tail -1 $OUT/pytest-gpu.log
timeout 170 python3 scripts/benchmark_speed.py --only 8gb-qlora --steps 8 --skip vramfit-auto-fused \
  --skip seed-as-written-uncapped --skip seed-as-written --skip seed-made-to-fit \
  --results /tmp/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(==|  ->)" $OUT/benchmark.log | cut -c1-120
for r in /tmp/bench/runs/*; do echo "$(basename $r): $(grep -o '"steady_tokens_per_s": [0-9.]*' $r/metrics.json)"; done
M=/tmp/vramfit-bench
CMD="train --preset auto --budget 8 --model $M/qwen2.5-7b --data $M/long.jsonl --set data.seq_len=512 --set lora.r=8 --set lora.alpha=16 --set lora.target_modules=[q_proj,v_proj] --set train.micro_batch=16 --set train.grad_accum=2 --set train.save_steps=1000 --set train.logging_steps=1"
mkdir -p /tmp/ab
for v in nolean sync new before nolean-2 sync-2 new-2 before-2; do
  [ $SECONDS -gt 470 ] && break
  X="--set train.max_steps=10"; P=$NEW
  case $v in
    before*) P=$OLD;;
    sync*) X="$X --set train.offload_embeddings_async=false";;
    nolean*) X="$X --set kernels.lean_recompute=false";;
  esac
  rm -rf /tmp/run-$v
  PYTHONPATH=$P timeout 62 python3 -m vramfit $CMD $X --out /tmp/run-$v > /tmp/ab/$v.log 2>&1
  echo "$v: $(grep -E '^(done|prediction)' /tmp/ab/$v.log | cut -c1-120 | tr '\n' ' ')"
  for f in metrics.json train.log; do cp /tmp/run-$v/$f /tmp/ab/$v-$f 2>/dev/null; done
  tar czf $OUT/ab.tar.gz -C /tmp ab
done
LEFT=$((580 - SECONDS))
if [ $LEFT -gt 90 ]; then
  rm -rf /tmp/run-prof
  VRAMFIT_PROFILE=$OUT/profile-8gb.txt timeout $LEFT python3 -m vramfit $CMD --set train.max_steps=8 \
    --out /tmp/run-prof > $OUT/profile-train.log 2>&1
  tail -2 $OUT/profile-train.log | cut -c1-160
  grep -A12 syncs_per_step $OUT/profile-8gb.txt | cut -c1-200
else
  echo "no time left for the profile ($LEFT s)"
fi
