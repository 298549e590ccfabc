#!/bin/bash
# One device call: our JAX benchmarks and the PyTorch peers on the same GPU, results as JSON lines
# in $OUT/results.jsonl (partial results survive a timeout). Usage: bash bench/gpu_all.sh [parts]
# The PyTorch/diffusers FLUX peer is not part of this repository: the parts that run it (pfwd,
# ptrain, ptraineager) need PEER=<path to that script>.
set -u
PARTS=${*:-matmul jfwd pfwd jtrain ptrain jgrpo pgrpo}
for part in $PARTS; do
  case $part in pfwd|ptrain|ptraineager)
    if [ -z "${PEER:-}" ] || [ ! -f "$PEER" ]; then
      echo "error: part '$part' needs PEER=<path to the PyTorch/diffusers FLUX peer script>" \
           "(PEER='${PEER:-}' is not a file); set it or leave out pfwd, ptrain, ptraineager." >&2
      exit 2
    fi ;;
  esac
done
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 TF_CPP_MIN_LOG_LEVEL=2
R="$OUT/results.jsonl"
run() { local t=$1; shift; echo "== $*" | tee -a "$OUT/log"; timeout "$t" "$@" 2>>"$OUT/log" | tee -a "$R"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/log"
python3 -c "import jax, flax, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)" | tee -a "$OUT/log"
for part in $PARTS; do
  case $part in
    matmul) run 60 python3 bench/flux_jax.py matmul ;;
    jfwd)   run 240 python3 bench/flux_jax.py forward flux-dev --batch=1 ;;
    jfwdscan) run 240 python3 bench/flux_jax.py forward flux-dev --batch=1 --scan ;;
    pfwd)   run 240 python3 "$PEER" flux-dev --compile ;;
    jtrain) run 200 python3 bench/flux_jax.py train flux-bench --batch=4 ;;
    ptrain) run 240 python3 "$PEER" flux-bench --compile --no-cudnn-sdp ;;
    ptraineager) run 120 python3 "$PEER" flux-bench --no-cudnn-sdp ;;
    jgrpo)  run 300 python3 bench/flux_jax.py grpo flux-bench --prompts=1 --group=12 --steps=16 --minibatches=3 ;;
    prof)   run 300 python3 bench/profile_forward.py flux-dev --batch=1 --dump="$OUT/hlo.txt" ;;
    profnomerge) XLA_FLAGS=--xla_disable_hlo_passes=dot-merger run 300 python3 bench/profile_forward.py flux-dev --batch=1 ;;
    profnotriton) XLA_FLAGS=--xla_gpu_enable_triton_gemm=false run 300 python3 bench/profile_forward.py flux-dev --batch=1 ;;
    gemms)  run 120 python3 bench/profile_forward.py --gemms ;;
    pgrpo)  run 240 python3 bench/peer_torch_grpo.py --prompts=1 --group=12 --steps=16 --ga=4 --iters=2 ;;
  esac
done
