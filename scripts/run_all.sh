# Sourced by the scripts that reproduce docs/results.md: `run_all` runs one `rewardtune run` per input line (its
# arguments, the last being --out's run directory), JOBS at a time (default 2; each run uses one thread on a CPU),
# each run's output in $root/logs/<run name>.log, and prints "<exit code> <run directory>" per run.
jobs=${JOBS:-2}
mkdir -p "$root/logs"
run_all() {
  xargs -P "$jobs" -L 1 bash -c 'out="${@: -1}"; python -m rewardtune run "$@" >"'"$root"'/logs/$(basename "$out").log" 2>&1; echo "$? $out"' _
}
