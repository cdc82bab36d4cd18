#!/usr/bin/env bash
# The engine benchmark on a lent GPU, in one device run (see the README's Benchmarks). The GPU machine has torch,
# transformers and safetensors but not diffusers: fetch the wheels here first, into an ignored .whl/ folder,
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata zipp
#
# then run `bash bench/gpu-check.sh` there with `.whl` carried. Results land in $OUT (or ./gpu-check/).
# Extra arguments go to bench/engine.py; CONFIGS picks the engine settings (compiling takes minutes per shape).
set -uo pipefail
out=${OUT:-gpu-check}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$out/gpu.txt"
cat "$out/gpu.txt"
python3 bench/engine.py --users 16 --max-batch 8 --configs "${CONFIGS:-eager,tuned,compiled}" --profile tuned "$@" \
    > "$out/engine.json" 2> "$out/engine.log"
status=$?
tail -20 "$out/engine.log"
cat "$out/engine.json"
exit $status
