set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
M=/tmp/m; mkdir -p $M
[ -f $M/spread.jsonl ] || python3 scripts/make_embedded_dataset.py --n 2000 --min-chars 100 --max-chars 500 --out $M/spread.jsonl > /dev/null
[ -d $M/qwen2.5-0.5b ] || python3 scripts/make_random_model.py scripts/archs/qwen2.5-0.5b.json $M/qwen2.5-0.5b --device cuda > /dev/null 2>&1
export PYTHONPATH=/tmp/site
S="--data $M/spread.jsonl --set train.max_steps=30 --set train.save_steps=30"
# The 0.5B at 8 GiB: the planner's choice (checkpointing, 16x1) against the fastest plan without checkpointing that fits (8x2).
python3 scripts/speed_ab.py --tree cur=src --repeats 1 --results $OUT/ab05 \
  --case "q05-8-auto=train --preset auto --budget 8 --model $M/qwen2.5-0.5b $S" \
  --case "q05-8-mb8-nockpt=train --preset auto --budget 8 --model $M/qwen2.5-0.5b $S --set train.micro_batch=8 --set train.grad_accum=2 --set train.grad_ckpt=false"
rm -rf $M/qwen2.5-0.5b
export PYTHONPATH=/tmp/site:$PWD/src
python3 scripts/prove_autofit.py --arch llama-3.1-8b --work /tmp/vramfit-autofit --results $OUT/session10
gzip -f $OUT/session10/autofit.log $OUT/ab05/ab.log
