set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD/src PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
# Session 11: the two calibration architectures whose rows were more than 5% under (Mistral
# QLoRA, Gemma2 eager LoRA at 4096), re-measured on the current stack.
python3 scripts/calibrate_memory.py --parallel 3 --work /tmp/calw --matrix scripts/calibration_matrix_archs.yaml --only mistral-7b --only gemma2-2b --results $OUT/archs11
ls $OUT/archs11; gzip -f $OUT/archs11/*.log 2>/dev/null
