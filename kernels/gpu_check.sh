#!/usr/bin/env bash
# One call on a lent CUDA machine (the `device` tool): block tuning (every candidate checked against float64),
# kernel correctness at real sizes, the benchmark table, short CUDA training runs and the processor tests on
# CUDA. Runs from the repo root; logs go to $OUT. Needs torch + triton there; the pure-Python packages the
# image lacks (diffusers, hydra, omegaconf, antlr4) travel in .devsite/, an ignored folder made here with
#   SP=$(python -c "import site; print(site.getsitepackages()[0])"); mkdir -p .devsite
#   for p in diffusers hydra omegaconf antlr4; do cp -r $SP/$p .devsite/; done
# and named in the call's carry. About 7 minutes on an H200.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/.devsite" WANDB_MODE=disabled HYDRA_FULL_ERROR=1
[ -e stepdistill/kernels ] || ln -s ../kernels stepdistill/kernels   # what pyproject's package-dir maps
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
stage() { echo; echo "=== $1 ($(date +%T))"; }

stage "kernels: tune, check, bench"
timeout 230 python3 -m stepdistill.kernels.bench --check --tune 2>&1 | tee "$OUT/bench.txt" | grep -v Warning

stage "gmm dmd2 1500 steps, CUDA"
start=$SECONDS
timeout 60 python3 -m stepdistill.train benchmark=gmm method=dmd2 trainer.max_steps=1500 trainer.progress=false \
  hydra.run.dir=/tmp/gmm_run > "$OUT/gmm.txt" 2>&1
echo "exit $?, wall $((SECONDS - start)) s" | tee -a "$OUT/gmm.txt"; tail -4 "$OUT/gmm.txt"

stage "gmm dmd (regression pairs) 300 steps, CUDA"
timeout 40 python3 -m stepdistill.train benchmark=gmm method=dmd trainer.max_steps=300 trainer.progress=false \
  eval.every=0 hydra.run.dir=/tmp/gmm_dmd_run > "$OUT/gmm_dmd.txt" 2>&1
echo "exit $?" | tee -a "$OUT/gmm_dmd.txt"; tail -3 "$OUT/gmm_dmd.txt"

stage "digits dmd2 300 steps with attention.backend=triton, CUDA"
timeout 80 python3 -m stepdistill.train benchmark=digits method=dmd2 trainer.max_steps=300 attention.backend=triton \
  trainer.progress=false eval.every=0 hydra.run.dir=/tmp/digits_run > "$OUT/digits.txt" 2>&1
echo "exit $?" | tee -a "$OUT/digits.txt"; tail -4 "$OUT/digits.txt"

stage "kernel and processor tests on CUDA"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_processor.py 2>&1 \
  | tail -8 | tee "$OUT/tests.txt"
