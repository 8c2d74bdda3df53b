#!/usr/bin/env bash
# One-shot attention check on an NVIDIA GPU (about 5 minutes): the attention tests with the
# real kernels ('cudnn', and 'pallas' non-interpret, against 'xla'), then the benchmark at
# sequence 2048 and 4096. Run from the repository root; logs go to $OUT (default ./gpu_check_out).
#   OUT=/some/dir bash tools/gpu_attention_check.sh
# Each step has its own time limit and a failing step does not stop the next.
set -x
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# tests/conftest.py only sets JAX_PLATFORMS=cpu when it is unset.
export JAX_PLATFORMS=cuda
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python3}"

{
  date
  nvidia-smi
  "$PYTHON" --version
  "$PYTHON" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__); print(jax.devices()); d = jax.devices()[0]; print(d.device_kind, d.client.platform_version)"
  "$PYTHON" -m pip list 2>/dev/null | grep -i -E "jax|flax|nvidia-cudnn|optax|pytest"
} > "$OUT/environment.txt" 2>&1
echo "environment: exit $?" >> "$OUT/status.txt"

timeout 120 "$PYTHON" -m pytest -p no:cacheprovider -v -rs --durations=15 \
  --junitxml="$OUT/test_attention.xml" tests/test_attention.py > "$OUT/test_attention.txt" 2>&1
echo "tests: exit $?" >> "$OUT/status.txt"

timeout 150 "$PYTHON" tools/benchmark.py attention --seq 2048 4096 > "$OUT/benchmark.txt" 2>&1
echo "benchmark: exit $?" >> "$OUT/status.txt"

# cuDNN takes segment ids as a mask (an additive bias); the cost of that path at 2048.
timeout 45 "$PYTHON" tools/benchmark.py attention --seq 2048 --padded > "$OUT/benchmark_padded.txt" 2>&1
echo "benchmark padded: exit $?" >> "$OUT/status.txt"

cat "$OUT/status.txt"
tail -n 30 "$OUT/test_attention.txt" "$OUT/benchmark.txt" "$OUT/benchmark_padded.txt"
