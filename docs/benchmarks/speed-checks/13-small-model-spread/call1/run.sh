set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,persistence_mode --format=csv | tee $OUT/gpu.txt
nproc >> $OUT/gpu.txt; cat /proc/loadavg >> $OUT/gpu.txt
for t in .gpu/old/src src; do
  PYTHONPATH=$PWD/$t:/tmp/site python3 -c "
import time,torch; torch.zeros(1,device='cuda')
from vramfit.gpu_memory import _nvml_process_bytes as f
f(); t=time.perf_counter()
for _ in range(20): f()
print('$t nvml sample ms', round((time.perf_counter()-t)/20*1e3,2))" 2>&1 | tail -1 | tee -a $OUT/gpu.txt
done
M=/tmp/m; mkdir -p $M
export PYTHONPATH=$PWD/src:/tmp/site
python3 scripts/make_embedded_dataset.py --n 2000 --min-chars 100 --max-chars 500 --out $M/spread.jsonl > /dev/null
for a in qwen2.5-0.5b qwen2.5-3b; do python3 scripts/make_random_model.py scripts/archs/$a.json $M/$a --device cuda > /dev/null 2>&1; done
export PYTHONPATH=/tmp/site
S="--data $M/spread.jsonl --set train.max_steps=30 --set train.save_steps=30"
python3 scripts/speed_ab.py --tree new=src --tree old=.gpu/old/src --repeats 2 --profile --results $OUT/ab \
  --case "q05-8=train --preset auto --budget 8 --model $M/qwen2.5-0.5b $S" \
  --case "q05-16=train --preset auto --budget 16 --model $M/qwen2.5-0.5b $S"
python3 scripts/speed_ab.py --tree new=src --tree old=.gpu/old/src --repeats 1 --results $OUT/ab \
  --case "q3b-12=train --preset auto --budget 12 --model $M/qwen2.5-3b $S"
gzip -f $OUT/ab/ab.log
