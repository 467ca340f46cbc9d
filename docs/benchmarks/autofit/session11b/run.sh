# call 1 (0.5B, 3B)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm --format=csv; lscpu | grep -i "model name"; cat /proc/loadavg) > $OUT/host.txt 2>&1
# The whole grid with session 11's auto-fit (train.grad_ckpt_layers) and refitted speed constants:
# out of sample. This call: the 0.5B and the 3B.
python3 scripts/prove_autofit.py --arch qwen2.5-0.5b --arch qwen2.5-3b --results $OUT/s11b
gzip -f $OUT/s11b/autofit.log

# call 2 (7B)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm --format=csv; lscpu | grep -i "model name"; cat /proc/loadavg) > $OUT/host.txt 2>&1
# The whole grid with session 11's auto-fit (train.grad_ckpt_layers) and refitted speed constants:
# out of sample. This call: the 7B.
python3 scripts/prove_autofit.py --arch qwen2.5-7b --results $OUT/s11b
gzip -f $OUT/s11b/autofit.log

# call 3 (8B)
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm --format=csv; lscpu | grep -i "model name"; cat /proc/loadavg) > $OUT/host.txt 2>&1
# The whole grid with session 11's auto-fit (train.grad_ckpt_layers) and refitted speed constants:
# out of sample. This call: the 8B.
python3 scripts/prove_autofit.py --arch llama-3.1-8b --results $OUT/s11b
gzip -f $OUT/s11b/autofit.log
