#!/usr/bin/env bash
# Runs the whole spike matrix once and appends one JSON line per run to
# bench/spike/results.jsonl. Each run is bounded by `timeout 120`.
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-/work/venv/bin/python}
OUT=bench/spike/results.jsonl
for n in 2000 5000; do
  for cfg in \
    "aiohttp --loop asyncio" \
    "aiohttp --loop uvloop" \
    "aiohttp --loop uvloop --fanout send_str" \
    "sansio --loop asyncio" \
    "sansio --loop uvloop" \
    "sansio --loop uvloop --fanout library" \
    "picows --loop uvloop" \
    "picows --loop uvloop --fanout send"; do
    # shellcheck disable=SC2086
    timeout 120 "$PY" bench/spike/drive.py $cfg --clients "$n" --events 200 | tee -a "$OUT"
    sleep 2
  done
done
