#!/usr/bin/env bash
# GPU benchmark (B1 at the paper's setting: one 8192x8192 bf16 layer, batch 1024; B2; B7: SmolLM2 population generation), from the repo root.
# Writes $OUT/gpu_bench.json and $OUT/gpu_bench.txt (OUT defaults to ./gpu_bench_out). Not timed on a GPU since B7 (N=4096) was added: leave it 8 minutes.
# Installs only what is missing: the package itself (no deps if they are present) and jax[cuda12] if jax sees no GPU.
set -euo pipefail
OUT="${OUT:-$PWD/gpu_bench_out}"; mkdir -p "$OUT"; export OUT
PY="${PYTHON:-python3}"
PIP="$PY -m pip install -q --timeout 30 --retries 1"
log() { echo "[gpu_bench] $*" | tee -a "$OUT/setup.log"; }
log "python: $($PY --version 2>&1)"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$OUT/setup.log" || true
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # esx from this checkout even if pip cannot install it
if ! (cd /tmp && $PY -c "import esx") 2>/dev/null; then
  log "installing esx (editable, no deps)"; $PIP --no-deps -e . 2>&1 | tail -3 | tee -a "$OUT/setup.log" || true
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  log "no nvidia-smi: this is not a GPU machine; refusing to install CUDA wheels (results will be for $($PY -c 'import jax; print(jax.devices()[0].platform)'))"
elif [ "${SKIP_INSTALL:-0}" != 1 ] && ! $PY -c "import jax, sys; sys.exit(0 if any(d.platform == 'gpu' for d in jax.devices()) else 1)" 2>/dev/null; then
  log "no GPU backend in jax; installing jax[cuda12] matching the installed jax"
  JV=$($PY -c "import jax; print(jax.__version__)" 2>/dev/null || echo "")
  if [ -n "$JV" ]; then $PIP "jax[cuda12]==$JV" 2>&1 | tail -3 | tee -a "$OUT/setup.log"
  else $PIP "jax[cuda12]" 2>&1 | tail -3 | tee -a "$OUT/setup.log"; fi
fi
$PY -c "import jax; print('devices:', jax.devices())" 2>&1 | tee -a "$OUT/setup.log"
$PY -c "import evosax" 2>/dev/null || { log "evosax missing: installing (B2 baseline)"; $PIP "evosax>=0.2" 2>&1 | tail -2 | tee -a "$OUT/setup.log" || true; }
timeout "${GPU_BENCH_TIMEOUT:-270}" $PY scripts/gpu_bench.py 2>&1 | tee "$OUT/gpu_bench.log"
