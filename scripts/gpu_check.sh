#!/usr/bin/env bash
# The device check for a session that has a GPU: one short script, about 3-5 minutes.
# It needs what CPU CI cannot show: a CUDA + AMP training step, the loss speed on the GPU,
# multi-channel sliding-window inference and predict on CUDA. Run it from the repository root
# after `pip install -e .` with a CUDA build of torch. Results go to ${OUT:-gpu-check}/.
set -euo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
export BESEG_CACHE_DIR="$out/cache"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" | tee "$out/device.txt"
# 1. Loss speed on the GPU (ratios measured in one run; peak memory from the CUDA allocator).
beseg bench loss --device cuda --repeats 30 | tee "$out/bench_loss_cuda.txt"
# 2. CUDA + AMP training: the phantom BE preset, short, then the same with Dice for comparison.
for system in segresnet_be segresnet_dice; do
    beseg train "phantom_spleen_$system" --out "$out/run_$system" --no-progress \
        train.device=cuda train.amp=true train.epochs=2 train.steps_per_epoch=20 train.val_every=2 \
        data.num_workers=4 | tee "$out/train_$system.txt"
done
# 3. Evaluate and predict on CUDA, output geometry checked against the input.
beseg evaluate "$out/run_segresnet_be" --device cuda | tee "$out/evaluate.txt"
image=$(ls "$BESEG_CACHE_DIR"/phantom-spleen-*/imagesTs/*.nii.gz | head -n 1)
beseg predict "$out/run_segresnet_be" "$image" --out "$out/pred" --device cuda
python - "$image" "$out/pred/$(basename "$image")" <<'PY' | tee "$out/predict_geometry.txt"
import sys, nibabel as nib, numpy as np
a, b = nib.load(sys.argv[1]), nib.load(sys.argv[2])
assert a.shape == b.shape and np.allclose(a.affine, b.affine), (a.shape, b.shape)
print("predict on CUDA: shape and affine match the input", a.shape)
PY
