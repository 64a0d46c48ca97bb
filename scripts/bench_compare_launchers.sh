#!/usr/bin/env bash
# Wall time of one 4-run phantom comparison (2 systems x 2 seeds, every run at 1 thread) executed three ways, one
# after another in one sitting: sequentially in one process, `--jobs 2`, and `--launcher slurm` (needs a cluster:
# scripts/slurm_cluster.sh start; export SLURM_CONF=...). Prints each time and its ratio to the sequential one.
#   scripts/bench_compare_launchers.sh [OUT_DIR] [KEY=VALUE ...]
set -euo pipefail
out="${1:-/tmp/beseg-bench-launchers}"
shift || true
rm -rf "$out" && mkdir -p "$out"
export BESEG_CACHE_DIR="$out/cache"
data="$out/phantom"
beseg data phantom "$data" --cases 24 --test-cases 0 >/dev/null
# The phantom_spleen presets (32^3 patches, batch 2, SegResNet 16 filters) on a shorter schedule, at 1 thread.
settings=(train.epochs=2 train.steps_per_epoch=8 train.val_every=2 train.threads=1 data.num_workers=0 "$@")
run() {  # NAME ARGS...: one comparison, its wall time in seconds
    local name="$1"; shift
    local start end
    start=$(date +%s.%N)
    beseg compare --data "$data" --systems dice,dice_be --seeds 2 --out "$out/$name" --no-progress --no-report \
        "${settings[@]}" "$@" >"$out/$name.log" 2>&1
    end=$(date +%s.%N)
    echo "$name $(echo "$end - $start" | bc)"
}
{
    run sequential
    run jobs2 --jobs 2
    if command -v sbatch >/dev/null && sinfo -h >/dev/null 2>&1; then run slurm --launcher slurm --cpus-per-run 1; fi
} | tee "$out/times.txt"
echo "# machine: $(nproc) cores; $(python -c 'import torch; print("torch", torch.__version__)'); settings: ${settings[*]}"
awk 'NR == 1 {base = $2} {printf "%-10s %7.1f s  %.2fx the sequential time\n", $1, $2, $2 / base}' "$out/times.txt"
for name in jobs2 slurm; do
    [ -d "$out/$name" ] || continue
    if diff -r -q --exclude=logs --exclude=slurm "$out/sequential" "$out/$name" 2>/dev/null | grep -q per_case.csv; then
        echo "$name: per-case numbers DIFFER from the sequential run"
    else
        echo "$name: per-case numbers identical to the sequential run"
    fi
done
