#!/usr/bin/env bash
# The device check for a session that has a GPU: one script, under 6 minutes on one H200 with 16 cores.
#
# It runs what CPU CI cannot, and measures what the cost plan needs:
#   1. the CUDA tests (fast vs literal BE in float32 and under float16/bfloat16 autocast, a loss step with no host
#      sync, a 2-step AMP training);
#   2. `beseg reproduce --dry-run` on Task09- and Task01-geometry phantoms (`beseg data phantom --like task09|task01`,
#      generated in the background meanwhile) with the paper presets: the measured training step, loader batch,
#      sliding-window validation per case, store build per case and peak GPU memory of every Table 1 system;
#   3. the loss speed on the GPU and the BE share of a SegResNet step (`beseg bench loss|train --device cuda`);
#   4. a short CUDA + AMP training of the phantom BE preset, then evaluate and predict on CUDA, the output geometry checked.
# Every step runs even if an earlier one failed; each has a time limit within the script's overall budget. The
# summary lists each step's status and ends with a block to paste into docs/benchmarks.md; the script exits 1 if
# any step failed or ran out of time.
#
# Run it from the repository root with python3 (torch with CUDA; MONAI, nibabel and beseg's other dependencies
# importable, e.g. on PYTHONPATH); it installs nothing. Outputs (5 files, no folders) go to ${OUT:-gpu-check}/:
#   summary.txt    step statuses, the figures, and the docs/benchmarks.md block
#   steps.log      every step's output
#   cost_task09.json, cost_task01.json   the dry runs' cost plans (plan.json's "cost")
#   device.txt     the GPU, driver and versions
# Working files (phantoms, store, runs) go to a temporary folder that is removed at the end (BESEG_GPU_CHECK_WORK
# keeps them in a folder of your choice).
set -uo pipefail
out="${OUT:-gpu-check}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
work="${BESEG_GPU_CHECK_WORK:-$(mktemp -d /tmp/beseg-gpu-check.XXXXXX)}"
[ -n "${BESEG_GPU_CHECK_WORK:-}" ] || trap 'rm -rf "$work"' EXIT
mkdir -p "$work"
export BESEG_CACHE_DIR="$work/cache"
py="${PYTHON:-python3}"
beseg() { "$py" -m beseg.cli "$@"; }
budget="${BESEG_GPU_CHECK_BUDGET_S:-335}"  # the steps, in seconds; with the summary the script stays under 6 minutes
start=$(date +%s)
log="$out/steps.log"
summary="$out/summary.txt"
: >"$log"
: >"$summary"
failed=0

# step NAME LIMIT_S COMMAND...: run COMMAND with at most LIMIT_S seconds (less if the budget has less left),
# append its output to steps.log, record its status and time.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((budget - ($(date +%s) - start)))
    [ "$limit" -gt "$left" ] && limit="$left"
    if [ "$limit" -lt 5 ]; then
        printf '%-28s SKIPPED (no time left in the %s s budget)\n' "$name" "$budget" | tee -a "$summary"
        failed=1
        return
    fi
    printf '\n===== %s (limit %s s) =====\n' "$name" "$limit" >>"$log"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" bash -o pipefail -c '"$@"' step "$@" >>"$log" 2>&1  # the functions below are exported
    rc=$?
    local status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; fi
    [ "$status" = ok ] || failed=1
    printf '%-28s %-18s %4d s\n' "$name" "$status" "$(($(date +%s) - t0))" | tee -a "$summary"
}

device() {
    "$py" - <<'PY' | tee "$out/device.txt"
import platform, subprocess, torch
assert torch.cuda.is_available(), "no CUDA device"
p = torch.cuda.get_device_properties(0)
smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
print(f"{p.name}, {p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} GPU(s); driver {smi.stdout.strip() or '?'}; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}); python {platform.python_version()}; "
      f"{len(__import__('os').sched_getaffinity(0))} CPU cores")
PY
}

cuda_tests() {
    local report="$work/pytest.txt"
    # -o addopts=: one process (the CUDA tests share one GPU), and no pytest-xdist needed on the node
    "$py" -m pytest -q -m cuda -p no:cacheprovider -o addopts= tests >"$report" 2>&1
    local rc=$?
    cat "$report"
    grep -Eq "[0-9]+ passed" "$report" || return 1  # nothing collected is a failure too
    if grep -Eq "[0-9]+ (failed|skipped|error)" "$report"; then echo "a CUDA test failed or was skipped"; return 1; fi
    return "$rc"
}

phantoms() {  # Task09 and Task01 geometry, 3 cases each (the paper protocol's split needs 2), in parallel
    beseg data phantom "$work/t09" --like task09 --cases 3 --test-cases 0 &
    local a=$! ra rb
    beseg data phantom "$work/t01" --like task01 --cases 3 --test-cases 0 &
    local b=$!
    wait "$a"; ra=$?
    wait "$b"; rb=$?
    if [ "$ra" -eq 0 ] && [ "$rb" -eq 0 ]; then touch "$work/phantoms.done"; else touch "$work/phantoms.failed"; fi
}

dry_run() {  # TASK: the paper presets' cost plan on the phantom; the plan's "cost" to cost_TASK.json
    local task="$1"
    while [ ! -f "$work/phantoms.done" ]; do
        if [ -f "$work/phantoms.failed" ] || ! kill -0 "$phantoms_pid" 2>/dev/null; then
            echo "the phantoms were not generated (see the phantoms part of steps.log)"
            return 1
        fi
        sleep 1
    done
    beseg reproduce --task "$task" --data "$work/${task/task/t}" --seeds 3 --out "$work/results-$task" \
        --dry-run --no-progress || return 1
    "$py" -c "import json,sys; json.dump(json.load(open(sys.argv[1]))['cost'], open(sys.argv[2], 'w'), indent=1)" \
        "$work/results-$task/plan.json" "$out/cost_$task.json"
}

short_training() {
    beseg data phantom "$work/ph" --cases 10 --test-cases 2 &&
    beseg train phantom_spleen_segresnet_be --data "$work/ph" --out "$work/run_be" --no-progress \
        train.device=cuda train.amp=true train.epochs=2 train.steps_per_epoch=20 train.val_every=2 data.num_workers=4 &&
    beseg evaluate "$work/run_be" --data "$work/ph" --device cuda &&
    image=$(ls "$work"/ph/imagesTs/*.nii.gz | head -n 1) &&
    beseg predict "$work/run_be" "$image" --out "$work/pred" --device cuda &&
    "$py" - "$image" "$work/pred/$(basename "$image")" <<'PY'
import sys, nibabel as nib, numpy as np
a, b = nib.load(sys.argv[1]), nib.load(sys.argv[2])
assert a.shape == b.shape and np.allclose(a.affine, b.affine), (a.shape, b.shape)
print("predict on CUDA: shape and affine match the input", a.shape)
PY
}

export out work py repo BESEG_CACHE_DIR PYTHONPATH
export -f beseg device cuda_tests phantoms dry_run short_training
echo "beseg GPU check, $(date -u +%Y-%m-%dT%H:%MZ), $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?')" | tee -a "$summary"
step device 30 device
# The phantoms are CPU work: generated while the GPU steps below run (at most 200 s).
timeout 200 bash -c phantoms </dev/null >"$work/phantoms.log" 2>&1 &
export phantoms_pid=$!
step cuda-tests 90 cuda_tests
step dry-run-task09 110 dry_run task09
step dry-run-task01 80 dry_run task01
{ printf '\n===== phantoms (in the background) =====\n'; cat "$work/phantoms.log" 2>/dev/null; } >>"$log"
kill "$phantoms_pid" 2>/dev/null  # done by now, unless the dry runs were cut short
step bench-loss 40 beseg bench loss --device cuda --repeats 30
step bench-train 40 beseg bench train --device cuda --repeats 5
step train-evaluate-predict 100 short_training

"$py" - "$out" >>"$summary" 2>>"$log" <<'PY' || { echo "the summary of the dry runs failed (see steps.log)" >>"$summary"; failed=1; }
"""The dry runs' figures as a docs/benchmarks.md block, with the paper schedule's projection at the MSD task's size."""
import json, sys
from pathlib import Path

from beseg.data.presets import get_preset
from beseg.engine.config import load_config
from beseg.experiment.cost import pool_wall
from beseg.experiment.outcome import duration_text

out = Path(sys.argv[1])
print("\n--- paste into docs/benchmarks.md (GPU section) ---")
for task in ("task09", "task01"):
    path = out / f"cost_{task}.json"
    if not path.is_file():
        print(f"\n{task}: no dry-run figures (see steps.log)")
        continue
    cost = json.loads(path.read_text())
    data = cost["data_figures"]["figures"]
    preset = get_preset(task)
    n_cases, n_val = preset.paper_split
    n_train = n_cases - n_val
    print(f"\n{task} (`beseg reproduce --task {task} --dry-run` on a {task}-geometry phantom), {cost['device']['describe']}:")
    print(f"store build of one case: {data['seconds']:.1f} s ({data['bytes'] / 2**20:.0f} MiB, "
          f"{data['voxels'] / 1e6:.1f} M voxels per channel at 1 mm); scoring a test case on its original grid: "
          f"{data['evaluation_case_s']:.1f} s")
    print("| system | patch x batch | step (s) | loss in step (ms) | loader batch, 1 process (s) | validation per case (s) "
          "| peak GPU memory: step / validation (GiB) | paper schedule per run (1 GPU) |")
    print("|---|---|---|---|---|---|---|---|")
    runs = []  # the 3 seeds of every system, in the plan's order
    for name, entry in cost["figures"].items():
        f = entry["figures"]
        if f.get("error"):
            print(f"| {name} | {f.get('patch')} | {f['error']} | | | | | |")
            continue
        config, _ = load_config(f"{task}_{name}")
        t = config.train
        steps = t.steps_per_epoch or max(1, n_train // config.data.batch_size)
        step = max(f["step_s"], f["batch_s"] / max(1, config.data.num_workers))
        validations = sum(1 for e in range(1, t.epochs + 1) if e % t.val_every == 0 or e == t.epochs)
        run = t.epochs * steps * step + validations * n_val * f["validation_s"] + n_val * (
            f["validation_s"] + data["evaluation_case_s"])
        runs += [run] * 3
        loss = f"{f['loss_s'] * 1e3:.1f}" if f.get("loss_s") is not None else "-"
        print(f"| {name} | {'x'.join(map(str, f['patch']))} x {f['patches']} | {f['step_s']:.3f} | {loss} | "
              f"{f['batch_s']:.3f} | {f['validation_s']:.2f} | {f['peak_bytes'] / 2**30:.1f} / "
              f"{f['validation_peak_bytes'] / 2**30:.1f} | {duration_text(run)} ({t.epochs} x {steps} steps, "
              f"{validations} x {n_val} validations) |")
    store = n_cases * data["seconds"]
    print(f"{len(runs)} runs (the systems above x 3 seeds) at the MSD size ({n_train}/{n_val} cases), projected from "
          f"these timings: {duration_text(store + pool_wall(runs, 1))} on one GPU, "
          f"{duration_text(store + pool_wall(runs, 8))} on 8 (--devices 0,...,7); the store build first: "
          f"{duration_text(store)}")
PY

printf '\ntotal %d s of the %d s budget\n' "$(($(date +%s) - start))" "$budget" | tee -a "$summary"
if [ "$failed" -ne 0 ]; then
    echo "gpu_check: some steps failed or ran out of time (summary.txt, steps.log)" | tee -a "$summary" >&2
    exit 1
fi
echo "gpu_check: all steps passed" | tee -a "$summary"
