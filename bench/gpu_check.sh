#!/usr/bin/env bash
# The accelerator checks, as one script for a GPU machine that has torch, numpy, pyarrow, PyYAML
# and pytest (wheels of anything missing, e.g. fastavro, in .whl/): the CPU-vs-CUDA tests, then
# the table and trainer benchmarks on cuda and the full quality benchmark (CowClip) on cuda.
# Logs go to $OUT (default: gpu-check/).
set -o pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numpy, pyarrow; print('torch', torch.__version__, 'numpy', numpy.__version__, 'pyarrow', pyarrow.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_device.py 2>&1 | tee "$OUT/test_device.log"
python3 -m bench.embedding_table --device cuda ${TABLE_ARGS:-} 2>&1 | tee "$OUT/bench_embedding_table.log"
python3 -m bench.trainer --device cuda 2>&1 | tee "$OUT/bench_trainer.log"
timeout "${QUALITY_TIMEOUT_S:-300}" python3 -m bench.quality --device cuda --skip-movielens ${QUALITY_ARGS:-} 2>&1 \
    | tee "$OUT/bench_quality.log"
