# Session 13, second device call: after the fixes to the first call's failures (StreamCopies
# handed torch 2.11's empty CPU checkpoint placeholder; the CUDA fused-LoRA test's reference
# drew its masks on fp32 inputs; the profile's kernel-to-operator link), every test of the three
# files on the GPU image's torch 2.11 (not only the gpu-marked ones), then two A/B groups in one
# call, on the same machine: the 24 GB method-kept plan with and without kernels.fused_lora,
# and the 8 GB plan with and without train.offload_async (and with both opt-ins).
#   bash docs/benchmarks/speed-checks/16-fused-lora-and-async/run.sh    (project root, .whl carried)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv; lscpu | grep -i "model name"; nproc) > $OUT/host.txt 2>&1
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_offload.py tests/test_fused_lora.py tests/test_step_profile.py > $OUT/pytest.log 2>&1; tail -4 $OUT/pytest.log
python3 scripts/benchmark_speed.py --only 24gb-lora-method-kept --fused-lora --skip vramfit-auto-fused \
  --skip seed-as-written --skip seed-as-written-uncapped --skip seed-made-to-fit \
  --results /tmp/ab24 --archive $OUT/ab24.tar.gz > $OUT/ab24.log 2>&1
python3 scripts/benchmark_speed.py --only 8gb-qlora --fused-lora --offload-async --skip vramfit-auto-fused \
  --skip vramfit-auto-fused-lora --skip seed-as-written --skip seed-as-written-uncapped --skip seed-made-to-fit \
  --results /tmp/ab8 --archive $OUT/ab8.tar.gz > $OUT/ab8.log 2>&1
for d in ab24 ab8; do grep -E "^(==|  ->)" $OUT/$d.log | cut -c1-160; cut -d, -f4,6,8,9 /tmp/$d/speed.csv; done
