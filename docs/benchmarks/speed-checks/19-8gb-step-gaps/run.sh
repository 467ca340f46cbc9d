# Session 16, second device call, one machine:
#   1. the 24 GB guide's method-kept group (dropout 0) through the benchmark: the seed as written
#      and the planner's plan as it now stands (8 x 2, layer inputs in host RAM, async copies,
#      lean recomputation), in the same call;
#   2. the 8 GB plan's step gaps (speed/17's profile: the GPU idle 14% of the step, at the
#      embedding lookup's ids.to("cpu"), the pageable copy of its rows and the step boundary),
#      A/B on the planner's own command: as planned, with train.offload_embeddings_async, with
#      train.dataloader_workers=2 (the collator off the training thread), with both, and the
#      plan again last (drift).
# Run from the project root with .whl carried:
#   bash docs/benchmarks/speed-checks/19-8gb-step-gaps/run.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
timeout 250 python3 scripts/benchmark_speed.py --only 24gb-lora-method-kept-dropout0 --steps 10 \
  --skip vramfit-auto-fused --skip seed-as-written-uncapped \
  --results /tmp/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(==|done|prediction)" $OUT/benchmark.log | cut -c1-160
M=/tmp/vramfit-bench
CMD="train --preset auto --budget 8 --model $M/qwen2.5-7b --data $M/long.jsonl --set data.seq_len=512 --set lora.r=8 --set lora.alpha=16 --set lora.target_modules=[q_proj,v_proj] --set train.micro_batch=16 --set train.grad_accum=2 --set train.max_steps=12 --set train.save_steps=1000 --set train.logging_steps=1"
mkdir -p /tmp/ab
for v in plan embed-async workers2 both plan-again; do
  case $v in
    plan|plan-again) X="" ;;
    embed-async) X="--set train.offload_embeddings_async=true" ;;
    workers2) X="--set train.dataloader_workers=2" ;;
    both) X="--set train.offload_embeddings_async=true --set train.dataloader_workers=2" ;;
  esac
  rm -rf /tmp/run-$v
  timeout 75 python3 -m vramfit $CMD $X --out /tmp/run-$v > /tmp/ab/$v.log 2>&1
  echo "$v: $(grep -E '^(done|prediction)' /tmp/ab/$v.log | cut -c1-120 | tr '\n' ' ')"
  for f in metrics.json train.log; do cp /tmp/run-$v/$f /tmp/ab/$v-$f 2>/dev/null; done
  tar czf $OUT/ab.tar.gz -C /tmp ab
done
