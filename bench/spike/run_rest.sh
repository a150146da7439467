#!/usr/bin/env bash
# REST-only repetitions (few clients, few events): appends JSON lines to
# bench/spike/results_rest.jsonl. Each run is bounded by `timeout 60`.
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-/work/venv/bin/python}
OUT=bench/spike/results_rest.jsonl
for rep in 1 2 3; do
  for cfg in "aiohttp --loop uvloop" "sansio --loop asyncio" "sansio --loop uvloop" "picows --loop uvloop"; do
    # shellcheck disable=SC2086
    timeout 60 "$PY" bench/spike/drive.py $cfg --clients 100 --events 10 --rest-seconds 2 | tee -a "$OUT"
  done
done
