#!/usr/bin/env bash
# The device checks of the attention kernels, prepared to run as-is when a GPU is lent.
#
#   bash benchmarks/gpu_session.sh correctness   # compiled-kernel tests + the LM-on-Pallas test
#   bash benchmarks/gpu_session.sh timing        # decode kernel, attention.py, BlockSizes sweep
#   bash benchmarks/gpu_session.sh all           # both (default)
#   bash benchmarks/gpu_session.sh lease         # one call under 9 min for a 15-minute lease:
#                                                # decode section, then the compiled kernel tests
#   bash benchmarks/gpu_session.sh hopper        # one call under 9.5 min: the Mosaic GPU (Hopper)
#                                                # forward's tests (stops there if they fail), its
#                                                # tile sweep, the forward table against cuDNN/XLA,
#                                                # a quick forward+backward table, the decode section
#
# Durations on an H200 (2026-11-29, first run): the LM check 53 s (then a section of gpu_check.py,
# now the test it duplicated), the decode section 53 s,
# `attention.py --skip-cpu` about 4 min (24 rows; `--quick` 60 s), the sweep 96 s. The compiled tests
# took over 4 min before their references were put under `jax.jit` (op-by-op dispatch compiled every
# op on the GPU). 2026-11-30 (second lease): the 10 compiled tests 4.9 min in all (bf16 at head_dim
# 128 48 s each: compiling the kernels' backward), the full `attention.py --skip-cpu` 4.2 min, the
# decode section over 100 s (it was cut there). With a 15-minute lease, `lease` is the one call to
# make: `correctness` and `timing` may run up to 7 and 10 minutes, more than one lease together.
# 2026-11-30 23:31 (third lease): `hopper` 322 s in all (its tests 72 s, sweep 30 s, the
# forward table about 90 s, the decode section under 90 s).
# Logs go to $OUT (or ./gpu_session_out): one file per step, JSON lines in each.
set -u
cd "$(dirname "$0")/.."
PHASE="${1:-all}"
OUT="${OUT:-$PWD/gpu_session_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TF_CPP_MIN_LOG_LEVEL=2
export JAX_PLATFORMS=cuda,cpu
PY="${PYTHON:-python3}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c 'import jax, jaxlib, flax, optax; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "flax", flax.__version__, "optax", optax.__version__); print(jax.devices())'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The compiled kernel tests (correctness only, so they may share the card: no preallocation;
# float32 references at highest matmul precision). $1: time limit in seconds.
kernel_tests() {
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$1" \
    "$PY" -m pytest -v -p no:cacheprovider --durations=0 -m gpu_only tests/test_flash_attention.py \
    >"$OUT/tests.log" 2>&1
  echo "kernel tests exit $?"
}

# gpu_check.py's decode section: parity rows (printed as they come) and timings. $1: time limit.
decode_section() {
  timeout "$1" "$PY" benchmarks/gpu_check.py --sections decode >"$OUT/decode.log" 2>&1
  echo "decode section exit $?"
  grep -h '"section": "decode_' "$OUT/decode.log" | cut -c1-400
}

if [[ "$PHASE" == correctness || "$PHASE" == all ]]; then
  kernel_tests 420 &
  tests_pid=$!
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest timeout 240 \
    "$PY" -m pytest -v -p no:cacheprovider \
    "tests/test_attention_dispatch.py::test_lm_trains_and_decodes_identically_on_pallas" \
    >"$OUT/lm.log" 2>&1
  echo "LM-on-Pallas test exit $?"
  wait "$tests_pid"
  grep -hE "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests.log" "$OUT/lm.log" | tail -n 20
fi

if [[ "$PHASE" == lease ]]; then
  # What is still unverified on a GPU, in one call (startup and the 30 s idle release between
  # calls cost too much of a 15-minute lease to split it): the decode section first (its flat-cache
  # parity rows and the fixed transposed-vs-flat timing), then the compiled kernel tests.
  decode_section 170
  kernel_tests 330
  grep -hE "PASSED|FAILED|ERROR|passed|failed" "$OUT/tests.log" | tail -n 12
fi

if [[ "$PHASE" == hopper ]]; then
  # The FlashAttention-3-style forward (kernels_pallas/flash_attention_hopper.py) has never run when
  # this is first called: its tests go first, and a failure ends the call early, leaving device time
  # for a fixed rerun. Each later step is cut at its own limit and at the call's 560 s.
  "$PY" -c 'import jax; from kernels_pallas.flash_attention_hopper import is_hopper
d = jax.devices()[0]
print("compute_capability", getattr(d, "compute_capability", None), "is_hopper", is_hopper())' \
    | tee -a "$OUT/env.txt"
  # The installed JAX's own FlashAttention-3 example, kept for comparison with the adapted copy.
  jax_dir=$("$PY" -c 'import jax, os; print(os.path.dirname(jax.__file__))')
  cp "$jax_dir/experimental/pallas/ops/gpu/attention_mgpu.py" "$OUT/" 2>/dev/null
  grep -q "is_hopper True" "$OUT/env.txt" || { echo "not an sm_90 GPU: nothing to check"; exit 1; }
  start=$SECONDS
  left() {  # min($1, what is left of the call's 560 s), at least 1
    local l=$(( 560 - (SECONDS - start) ))
    (( l < $1 )) && echo $(( l > 1 ? l : 1 )) || echo "$1"
  }
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$(left 150)" \
    "$PY" -m pytest -v -x -p no:cacheprovider --durations=0 -m gpu_only \
    tests/test_flash_attention_hopper.py >"$OUT/tests_hopper.log" 2>&1
  rc=$?
  echo "hopper tests exit $rc"
  grep -hE "PASSED|FAILED|ERROR|passed|failed|Error" "$OUT/tests_hopper.log" | tail -n 12
  if (( rc != 0 )); then
    tail -c 3000 "$OUT/tests_hopper.log"
    date -u
    exit 1
  fi
  timeout "$(left 110)" "$PY" benchmarks/gpu_check.py --sections hopper_sweep --sweep_seconds 90 \
    >"$OUT/hopper_sweep.log" 2>&1
  echo "hopper sweep exit $?"
  tail -n 1 "$OUT/hopper_sweep.log" | cut -c1-1500
  timeout "$(left 170)" "$PY" benchmarks/attention.py --skip-cpu --modes fwd \
    --impls pallas,cudnn,xla >"$OUT/attention_fwd.log" 2>&1
  echo "attention fwd exit $?, rows: $(grep -c seq_len "$OUT/attention_fwd.log")"
  tail -c 600 "$OUT/attention_fwd.log"
  timeout "$(left 75)" "$PY" benchmarks/attention.py --skip-cpu --quick --modes fwd_bwd \
    --impls pallas,pallas_triton,cudnn >"$OUT/attention_fwd_bwd.log" 2>&1
  echo "attention fwd_bwd exit $?, rows: $(grep -c seq_len "$OUT/attention_fwd_bwd.log")"
  decode_section "$(left 90)"
fi

if [[ "$PHASE" == timing || "$PHASE" == all ]]; then
  # Timing: one process at a time.
  decode_section 170
  timeout 300 "$PY" benchmarks/attention.py --skip-cpu >"$OUT/attention.log" 2>&1
  echo "attention exit $?, rows: $(grep -c seq_len "$OUT/attention.log")"
  tail -c 800 "$OUT/attention.log"
  timeout 130 "$PY" benchmarks/gpu_check.py --sections sweep --sweep_seconds 110 \
    >"$OUT/sweep.log" 2>&1
  tail -n 1 "$OUT/sweep.log"
fi
date -u
