# call 1
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm --format=csv; lscpu | grep -i "model name"; cat /proc/loadavg) > $OUT/host.txt 2>&1
# The auto-fit cells whose plan changes with train.grad_ckpt_layers (session 11).
python3 scripts/prove_autofit.py --arch qwen2.5-0.5b --budgets 8 12 --results $OUT/s11
python3 scripts/prove_autofit.py --arch qwen2.5-3b --budgets 16 24 40 --results $OUT/s11
python3 scripts/prove_autofit.py --arch qwen2.5-7b --budgets 16 24 --results $OUT/s11
gzip -f $OUT/s11/autofit.log

# call 2
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi topo -m; lscpu; numactl -H) > $OUT/topo.txt 2>&1
# The 8B's auto-fit cells whose plan changes with train.grad_ckpt_layers (session 11).
python3 scripts/prove_autofit.py --arch llama-3.1-8b --budgets 16 24 40 --results $OUT/s11
gzip -f $OUT/s11/autofit.log
# The 0.5B's per-process speed spread: the same plan, alternately unpinned and with the
# process (and its children) held to four cores.
M=/tmp/m; mkdir -p $M $OUT/aff
python3 scripts/make_random_model.py scripts/archs/qwen2.5-0.5b.json $M/q05 --device cuda > /dev/null 2>&1
D=/tmp/vramfit-autofit/spread.jsonl
for i in 1 2 3; do
  for mode in free pin; do
    P=""; [ $mode = pin ] && P="taskset -c 4-7"
    $P python3 -m vramfit train --preset auto --budget 24 --model $M/q05 --data $D --out $M/r-$mode-$i --set train.max_steps=30 --set train.save_steps=30 > $OUT/aff/$mode-$i.log 2>&1
    echo "$mode $i $(grep -h '^prediction' $OUT/aff/$mode-$i.log)"
    rm -rf $M/r-$mode-$i
  done
done
