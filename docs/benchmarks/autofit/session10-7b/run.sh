set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(lscpu | grep -i "model name"; cat /proc/loadavg) > $OUT/host.txt 2>&1
python3 scripts/benchmark_speed.py --only 24gb-lora-method-kept --no-fused --results $OUT/bench > $OUT/bench.out 2>&1
tail -5 $OUT/bench.out
rm -rf /tmp/vramfit-bench/qwen2.5-7b
python3 scripts/prove_autofit.py --arch qwen2.5-7b --budgets 8 12 16 --results $OUT/a
gzip -f $OUT/a/autofit.log
cd $OUT && tar czf bench.tgz bench && rm -rf bench
