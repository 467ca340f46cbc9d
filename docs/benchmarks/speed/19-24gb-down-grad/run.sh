# Session 16, third device call. The memory model no longer counts PEFT's extra input-gradient
# copies at an adapted down_proj where kernels.fused_lora's 16-bit function makes none
# (memory.down_input_grad_copies): the 24 GB guide's method-kept plans were over-predicted by
# 0.6-1.8 GiB. With the room it now sees, the planner keeps the embedding table on the GPU for
# the dropout-0 group (predicted 22.57 GiB, 12,440 tokens/s on an H100). One machine:
#   1. group 24gb-lora-method-kept-dropout0: the seed as written and the planner's new plan;
#   2. group 24gb-lora-method-kept (dropout 0.05): the seed as written and the planner's plan
#      (unchanged, now predicted 21.98 GiB where it was 22.44), to check the half count with dropout.
# Run from the project root with .whl carried:
#   bash docs/benchmarks/speed/19-24gb-down-grad/run.sh
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
timeout 470 python3 scripts/benchmark_speed.py --only 24gb-lora-method-kept-dropout0 --only 24gb-lora-method-kept --steps 10 \
  --skip vramfit-auto-fused --skip seed-as-written-uncapped --skip seed-made-to-fit \
  --results /tmp/bench --archive $OUT/bench.tar.gz > $OUT/benchmark.log 2>&1
grep -E "^(==|done|prediction)" $OUT/benchmark.log | cut -c1-160
