# Session 13, last device call (the third was taken back mid-run, with its results): the
# tests of the three files on torch 2.11, then the 8 GB plan with train.offload_async pinned,
# now that StreamCopies holds each copied tensor until the compute stream has waited for its
# copy instead of record_stream (which left 0.39 GiB more reserved: speed-checks/16).
#   bash docs/benchmarks/speed-checks/17-async-hold/run.sh    (project root, .whl carried)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > $OUT/host.txt 2>&1
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_offload.py tests/test_fused_lora.py tests/test_step_profile.py > $OUT/pytest.log 2>&1; tail -3 $OUT/pytest.log
python3 scripts/benchmark_speed.py --only 8gb-qlora --offload-async --skip seed-as-written --skip seed-as-written-uncapped \
  --skip seed-made-to-fit --skip vramfit-auto --skip vramfit-auto-fused --peak table \
  --results /tmp/r8 --archive $OUT/r8.tar.gz > $OUT/r8.log 2>&1
grep -E "^(==|  ->)" $OUT/r8.log | cut -c1-120; cut -d, -f4,6,8,9 /tmp/r8/speed.csv; grep -E "^step [56]" /tmp/r8/runs/*/train.log | cut -c1-200
