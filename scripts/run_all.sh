# Sourced by the scripts that reproduce docs/results.md: `run_all` runs one `rewardtune run` per input line (its
# arguments, the last being --out's run directory), JOBS at a time (default 2; each run uses one thread on a CPU),
# each run's output in $root/logs/<run name>.log, and prints "<exit code> <run directory>" per run. A run that
# finished before (its eval.json is there) is skipped; one that stopped part way (checkpoints, no eval.json) is
# resumed with --resume, its log appended to.
jobs=${JOBS:-2}
mkdir -p "$root/logs"
run_all() {
  xargs -r -P "$jobs" -L 1 bash -c '
    out="${@: -1}"; log="'"$root"'/logs/$(basename "$out").log"
    if [ -f "$out/eval.json" ]; then echo "0 $out (finished before)"; exit 0; fi
    if [ -d "$out/checkpoints" ]; then python -m rewardtune run "$@" --resume >>"$log" 2>&1
    else python -m rewardtune run "$@" >"$log" 2>&1; fi
    echo "$? $out"' _
}
