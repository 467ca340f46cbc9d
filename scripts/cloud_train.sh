#!/usr/bin/env bash
# cloud_train.sh: detect, train and merge on a rented GPU machine, in one command that
# is safe to run again. Copy it onto the machine (vramfit installed), then:
#
#   bash cloud_train.sh --model Qwen/Qwen2.5-7B --data train.jsonl --preset 24gb
#
# Every argument goes to `vramfit train`, except --out: the run directory is fixed
# (VRAMFIT_OUT, default runs/cloud) so that running the same command again after a
# preemption, a crash or a reboot continues the run from its last checkpoint instead
# of starting over, and a run that already finished is not trained again. A finished
# merge is not redone either. Everything is appended to a log (VRAMFIT_LOG, default
# the run directory's path + .log: beside it, because vramfit only writes into a new
# or empty --out).
#
# Exit status: 0 when the merged model (or, for full fine-tuning, the model) is there;
# otherwise vramfit's own code: 75 = preempted, run this again to continue; 2 = bad
# input; 3 = the plan does not fit; 4 = training failed (docs/cli.md, exit codes).
#
# Environment: VRAMFIT_OUT, VRAMFIT_LOG, VRAMFIT (the command, default `vramfit`,
# e.g. VRAMFIT="python -m vramfit"). Multi-node: run it on every node with the same
# arguments plus --nodes N --node-rank K --master-addr NODE0_IP (docs/distributed.md).
set -euo pipefail

OUT="${VRAMFIT_OUT:-runs/cloud}"
OUT="${OUT%/}"
LOG="${VRAMFIT_LOG:-$OUT.log}"
read -r -a VRAMFIT <<<"${VRAMFIT:-vramfit}"

for arg in "$@"; do
  case "$arg" in
    -h | --help)
      # The header above is the usage; `vramfit train --help` lists the arguments it passes on.
      sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    -o | --out | --out=* | -o?*)
      echo "error: cloud_train.sh fixes the run directory; set VRAMFIT_OUT instead of passing $arg" >&2
      exit 2
      ;;
  esac
done

say() { echo "[$(date -u +%Y-%m-%dT%H:%M:%SZ)] cloud_train: $*"; }

main() {
  say "log: $LOG; run directory: $OUT; arguments: $*"
  say "vramfit detect"
  "${VRAMFIT[@]}" detect

  # The same command continues the run in $OUT (or says it is complete and trains nothing).
  say "vramfit train $* --out $OUT"
  "${VRAMFIT[@]}" train "$@" --out "$OUT"

  # Merge writes $OUT/merged atomically, so if it exists it is complete: skip it
  # rather than refusing (exit 2) or redoing it with --force on every rerun.
  if [ -d "$OUT/merged" ]; then
    say "$OUT/merged exists: merge already done, skipping"
  elif [ -d "$OUT/model" ] && [ ! -d "$OUT/adapter" ]; then
    say "full fine-tuning: $OUT/model is the trained model, nothing to merge"
  else
    say "vramfit merge $OUT"
    "${VRAMFIT[@]}" merge "$OUT"
  fi
  say "done"
}

finish() {
  local status=$?
  if [ "$status" -ne 0 ]; then
    local why=""
    [ "$status" -eq 75 ] && why=": preempted, run the same command again to continue"
    say "failed with exit $status$why" | tee -a "$LOG" >&2
  fi
}

mkdir -p "$(dirname "$LOG")"
trap finish EXIT
# pipefail + errexit: the script stops with main's status (75, 2, 4...), not tee's.
main "$@" 2>&1 | tee -a "$LOG"
