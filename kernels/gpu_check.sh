#!/usr/bin/env bash
# One call on a lent CUDA machine (the `device` tool): block tuning (every candidate checked against float64),
# kernel correctness at real sizes, the benchmark table, short CUDA training runs and the kernel tests on CUDA.
#   bash kernels/gpu_check.sh                   # every stage, about 8 minutes on an H200
#   BENCH_ARGS="--check --tune fwd_jvp" bash kernels/gpu_check.sh tests bench scm   # the named stages only
#   bash kernels/gpu_check.sh precision         # fp32 / bf16 / fp16 digits runs side by side (~2 minutes)
# Runs from the repo root; logs go to $OUT. Needs torch + triton there; the pure-Python packages the image
# lacks (diffusers, hydra, omegaconf, antlr4) travel in .devsite/, an ignored folder made here with
#   SP=$(python -c "import site; print(site.getsitepackages()[0])"); mkdir -p .devsite
#   for p in diffusers hydra omegaconf antlr4; do cp -r $SP/$p .devsite/; done
# and named in the call's carry.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/.devsite" WANDB_MODE=disabled HYDRA_FULL_ERROR=1
[ -e stepdistill/kernels ] || ln -s ../kernels stepdistill/kernels   # what pyproject's package-dir maps
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
stage() { echo; echo "=== $1 ($(date +%T))"; }
train() {  # name, timeout, overrides...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" python3 -m stepdistill.train trainer.progress=false hydra.run.dir=/tmp/$name "$@" \
    > "$OUT/$name.txt" 2>&1
  echo "exit $?, wall $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"; tail -4 "$OUT/$name.txt"
}

run_tests() {
  stage "kernel and processor tests on CUDA"
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_processor.py 2>&1 \
    | tail -8 | tee "$OUT/tests.txt"
}
run_bench() {
  stage "kernels: ${BENCH_ARGS:=--check --tune}"
  # shellcheck disable=SC2086
  timeout 300 python3 -m stepdistill.kernels.bench $BENCH_ARGS 2>&1 | tee "$OUT/bench.txt" | grep -v Warning
}
run_gmm() {
  stage "gmm dmd2 1500 steps, CUDA"
  train gmm 60 benchmark=gmm method=dmd2 trainer.max_steps=1500
  stage "gmm dmd (regression pairs) 300 steps, CUDA"
  train gmm_dmd 40 benchmark=gmm method=dmd trainer.max_steps=300 eval.every=0
}
run_digits() {
  stage "digits dmd2 300 steps with attention.backend=triton, CUDA"
  train digits 80 benchmark=digits method=dmd2 trainer.max_steps=300 attention.backend=triton eval.every=0
}
run_scm() {  # sCM's tangent runs torch.func.jvp through the UNet: the fused forward+JVP kernel in its attention
  stage "digits scm 300 steps with attention.backend=triton, CUDA"
  train scm 90 benchmark=digits method=scm trainer.max_steps=300 attention.backend=triton
}
run_precision() {  # fp16 goes through accelerate's GradScaler: the trainer unscales before clipping (CPU tests
  # can only use torch's CPU scaler). Grad norms and losses should track fp32's; bf16 needs no scaler.
  stage "digits dmd2 300 steps in fp32 / bf16 / fp16, CUDA"
  for p in no bf16 fp16; do
    echo "--- trainer.mixed_precision=$p" | tee -a "$OUT/precision.txt"
    train digits_$p 100 benchmark=digits method=dmd2 trainer.max_steps=300 eval.every=0 logger.every=50 \
      trainer.mixed_precision=$p
    python3 -c "import json, sys
for r in map(json.loads, open(sys.argv[1])):
    if r['kind'] == 'train' and 'generator/grad_norm' in r:
        print(r['step'], {k: round(v, 4) for k, v in r.items() if k.endswith(('grad_norm', '/loss'))})" \
      /tmp/digits_$p/metrics.jsonl | tee -a "$OUT/precision.txt"
  done
}

# precision is not in the default list (the default already takes ~8 of a call's 10 minutes): name it
for s in ${@:-tests bench gmm digits scm}; do
  case $s in
    tests) run_tests ;; bench) run_bench ;; gmm) run_gmm ;; digits) run_digits ;; scm) run_scm ;;
    precision) run_precision ;;
    *) echo "unknown stage $s: choose among tests bench gmm digits scm precision"; exit 2 ;;
  esac
done
