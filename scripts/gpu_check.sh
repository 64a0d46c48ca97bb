#!/usr/bin/env bash
# The device check for a session that has a GPU: one short script, about 5 minutes on one GPU.
# It runs what CPU CI cannot: the CUDA tests (fast vs literal BE in float32 and under float16/bfloat16
# autocast, a loss step with no host sync, a 2-step AMP training), the loss speed on the GPU, the BE
# share of a SegResNet step, a short CUDA + AMP training, evaluate and predict on CUDA with the output
# geometry checked. It exits non-zero on any failure or mismatch. Run it from the repository root after
# `pip install -e ".[test]"` with a CUDA build of torch. Results go to ${OUT:-gpu-check}/.
set -euo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
export BESEG_CACHE_DIR="$out/cache"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__)" | tee "$out/device.txt"

# 1. CUDA tests; exit code 5 (nothing collected) is a failure too.
python -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$out/pytest_cuda.txt"
grep -Eq "[0-9]+ passed" "$out/pytest_cuda.txt"
if grep -Eq "[0-9]+ (failed|skipped|error)" "$out/pytest_cuda.txt"; then
    echo "gpu_check: a CUDA test failed or was skipped" >&2
    exit 1
fi

# 2. Loss speed on the GPU: fast/literal and fast/DiceLoss ratios measured in one run.
beseg bench loss --device cuda --repeats 30 | tee "$out/bench_loss_cuda.txt"

# 3. The BE share of a SegResNet training step (float16 autocast) and sliding-window time.
beseg bench train --device cuda --repeats 5 | tee "$out/bench_train_cuda.txt"

# 4. CUDA + AMP training of the phantom BE preset, then evaluate and predict on CUDA.
beseg train phantom_spleen_segresnet_be --out "$out/run_be" --no-progress \
    train.device=cuda train.amp=true train.epochs=2 train.steps_per_epoch=20 train.val_every=2 \
    data.num_workers=4 | tee "$out/train_be.txt"
beseg evaluate "$out/run_be" --device cuda | tee "$out/evaluate.txt"
image=$(ls "$BESEG_CACHE_DIR"/phantom-spleen-*/imagesTs/*.nii.gz | head -n 1)
beseg predict "$out/run_be" "$image" --out "$out/pred" --device cuda
python - "$image" "$out/pred/$(basename "$image")" <<'PY' | tee "$out/predict_geometry.txt"
import sys, nibabel as nib, numpy as np
a, b = nib.load(sys.argv[1]), nib.load(sys.argv[2])
assert a.shape == b.shape and np.allclose(a.affine, b.affine), (a.shape, b.shape)
print("predict on CUDA: shape and affine match the input", a.shape)
PY
echo "gpu_check: all checks passed" | tee "$out/result.txt"
