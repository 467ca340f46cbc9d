set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(lscpu; cat /proc/loadavg; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv) > $OUT/host.txt 2>&1
M=/tmp/m; mkdir -p $M
[ -f $M/spread.jsonl ] || python3 scripts/make_embedded_dataset.py --n 2000 --min-chars 100 --max-chars 500 --out $M/spread.jsonl > /dev/null
[ -d $M/qwen2.5-0.5b ] || python3 scripts/make_random_model.py scripts/archs/qwen2.5-0.5b.json $M/qwen2.5-0.5b --device cuda > /dev/null 2>&1
export PYTHONPATH=/tmp/site
S="--data $M/spread.jsonl --set train.max_steps=30 --set train.save_steps=30"
python3 scripts/speed_ab.py --tree cur=src --repeats 3 --results $OUT/omp \
  --case "q05-8=train --preset auto --budget 8 --model $M/qwen2.5-0.5b $S" \
  --case "q05-8-omp1=train --preset auto --budget 8 --model $M/qwen2.5-0.5b $S --set launch.env.OMP_NUM_THREADS=1" \
  --case "q05-16=train --preset auto --budget 16 --model $M/qwen2.5-0.5b $S" \
  --case "q05-16-omp1=train --preset auto --budget 16 --model $M/qwen2.5-0.5b $S --set launch.env.OMP_NUM_THREADS=1"
gzip -f $OUT/omp/ab.log
