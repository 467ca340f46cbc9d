set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
(nvidia-smi --query-gpu=name,clocks.max.sm --format=csv; lscpu | grep -i "model name") > $OUT/host.txt 2>&1
# Where the 24 GB guide's method-kept plan (16-bit LoRA r128 all-linear, seq 1536) spends its step:
# the planner's own plan, profiled (VRAMFIT_PROFILE: 4 steps after 3 warm-up steps).
M=/tmp/m; mkdir -p $M
python3 scripts/make_embedded_dataset.py --n 400 --min-chars 2100 --max-chars 2600 --out $M/long.jsonl > /dev/null
python3 scripts/make_random_model.py scripts/archs/qwen2.5-7b.json $M/qwen2.5-7b --device cuda > /dev/null 2>&1
VRAMFIT_PROFILE=$OUT/profile-24gb-lora-r128.txt python3 -m vramfit train --preset auto --budget 24 --model $M/qwen2.5-7b --data $M/long.jsonl --out $M/run --set data.seq_len=1536 --set lora.r=128 --set lora.target_modules=all-linear --set train.lr=0.0001 --set method=lora --set train.max_steps=10 --set train.save_steps=1000 > $OUT/train.log 2>&1
tail -3 $OUT/train.log; cp $M/run/plan.yaml $M/run/metrics.json $OUT/ 2>/dev/null
head -60 $OUT/profile-24gb-lora-r128.txt
