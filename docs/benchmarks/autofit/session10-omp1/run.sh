set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(lscpu | grep -i "model name"; cat /proc/loadavg) > $OUT/host.txt 2>&1
rm -rf /tmp/m
python3 scripts/prove_autofit.py --arch qwen2.5-0.5b --results $OUT/a
python3 scripts/prove_autofit.py --arch qwen2.5-3b --budgets 8 12 16 --results $OUT/a
gzip -f $OUT/a/autofit.log
