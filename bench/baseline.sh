#!/usr/bin/env bash
# Issue #13's side-by-side set at the issue's sizes: each benchmark runs Bastion then
# soketi, --repeat rounds (default 3), medians; one JSON file per benchmark in OUT_DIR,
# plus machine.jsonl (nproc, CPU model, load average, commit) written before each step.
#
#   bench/baseline.sh OUT_DIR            # everything, the 14-minute soak x3 included
#   SKIP_SOAK=1 bench/baseline.sh OUT_DIR
#   STEPS="soak" bench/baseline.sh OUT_DIR       # only these steps
#   REPEAT=1 SOAK_MINUTES=3 WAIT_IDLE=0 bench/baseline.sh OUT_DIR
# Before each run it waits (at most WAIT_MAX=300 s) until WAIT_IDLE=0.7 of the machine's
# CPU is idle: other people's test suites come and go on a shared box.
#
# Needs soketi from /work/shared/peers/install-soketi.sh. Run from the repository root.
set -u
OUT=${1:?usage: bench/baseline.sh OUT_DIR}
PY=${PYTHON:-.venv/bin/python}
REPEAT=${REPEAT:-3}
# Start each run in a lull of the shared machine when there is one (bounded wait).
QUIET=(--wait-idle "${WAIT_IDLE:-0.7}" --wait-max "${WAIT_MAX:-300}")
mkdir -p "$OUT"

machine() {  # append one line per step: what the machine looked like when it started
  "$PY" - "$1" >>"$OUT/machine.jsonl" <<'PY'
import json, os, subprocess, sys, time
sys.path.insert(0, "bench")
from _common import machine_info
info = machine_info()
info["step"] = sys.argv[1]
info["utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(json.dumps(info))
PY
}

step() {  # step NAME command...
  local name=$1
  shift
  case " ${STEPS:-client_events rest_triggers connect_storm reconnect_storm json_codecs soak} " in
    *" $name "*) ;;
    *) return 0 ;;
  esac
  machine "$name"
  echo "== $name: $*" >&2
  "$@" >"$OUT/$name.json" 2>"$OUT/$name.stderr" || echo "   $name exited $?" >&2
  [ -s "$OUT/$name.stderr" ] || rm -f "$OUT/$name.stderr"
}

step client_events "$PY" bench/client_events.py --compare soketi --repeat "$REPEAT" "${QUIET[@]}"
step rest_triggers "$PY" bench/rest_triggers.py --compare soketi --repeat "$REPEAT" "${QUIET[@]}"
step connect_storm "$PY" bench/connect_storm.py --compare soketi --repeat "$REPEAT" "${QUIET[@]}"
step reconnect_storm "$PY" bench/connect_storm.py --reconnect-storm --compare soketi --repeat "$REPEAT" "${QUIET[@]}"
step json_codecs "$PY" bench/json_codecs.py "${QUIET[@]}"
if [ -z "${SKIP_SOAK:-}" ]; then
  step soak "$PY" bench/soak.py --compare soketi --repeat "$REPEAT" --minutes "${SOAK_MINUTES:-14}" "${QUIET[@]}"
fi
machine end
