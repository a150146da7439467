"""The REST replay guard: memory per remembered signature, at the cap, and cost per check.

Pure Python, no server: a :class:`~bastion.security.replay.ReplayGuard` is fed
distinct, real-looking signatures (64 lowercase hex, as the REST check accepts
them) on a simulated clock, so ten minutes of traffic take a second or two.

Measurements:

* ``memory``: the guard filled to ``--entries`` signatures (timestamps spread over
  the window, as a steady publisher makes them), traced with :mod:`tracemalloc`:
  bytes in total and per entry (the signatures themselves included, since the
  guard keeps them alive);
* ``publisher``: one publisher at ``--rate`` signed calls a second, current
  timestamps, for ``--seconds`` simulated seconds: how many calls were refused
  (anything but ``accepted``), the entries held at the end, and the horizon's lag
  behind the clock;
* ``check_us``: mean wall-clock microseconds per ``check`` while the guard is full
  and evicting (the steady state of a busy app), and while it is not full.

Prints one JSON object. Usage::

    python bench/replay_guard.py [--entries 100000] [--rate 200] [--seconds 900]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import platform
import sys
import time
import tracemalloc
from collections import Counter
from typing import Any

from bastion.security.replay import ReplayGuard

WINDOW = 600
GRACE = 2.0
START = 1_800_000_000.0


def signature(index: int) -> str:
    """A distinct 64-hex signature, like the REST check lets through."""
    return hashlib.sha256(index.to_bytes(8, "big")).hexdigest()


def memory(entries: int) -> dict[str, Any]:
    """Bytes a guard filled to ``entries`` keeps alive (timestamps over 500 s of the window).

    Each signature is made inside the traced region and dropped by the caller right
    after the check, so what is still allocated at the end is what the guard keeps:
    its tables and the signatures (or keys made from them) it holds on to.
    """
    gc.collect()
    tracemalloc.start()
    baseline, _ = tracemalloc.get_traced_memory()
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=entries, repeat_grace_seconds=GRACE)
    per_second = -(-entries // 500)
    for i in range(entries):
        now = START + i // per_second
        guard.check(signature(i), int(now), now)
    # Past the repeat grace, as in steady state (grace bookkeeping is short-lived).
    now = START + entries // per_second + GRACE + 1
    guard.check(signature(entries), int(now), now)
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    total = held - baseline
    return {
        "entries": len(guard),
        "bytes": total,
        "bytes_per_entry": round(total / max(1, len(guard)), 1),
        "mib": round(total / 2**20, 2),
    }


def publisher(entries: int, rate: int, seconds: int) -> dict[str, Any]:
    """One publisher at ``rate`` calls a second with current timestamps."""
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=entries, repeat_grace_seconds=GRACE)
    verdicts: Counter[str] = Counter()
    first_refusal: float | None = None
    for tick in range(seconds * rate):
        now = START + tick / rate
        verdict = guard.check(signature(tick), int(now), now)
        verdicts[verdict.value] += 1
        if verdict.value != "accepted" and first_refusal is None:
            first_refusal = now - START
    horizon = getattr(guard, "horizon", None)
    end = START + seconds
    return {
        "rate_per_s": rate,
        "simulated_seconds": seconds,
        "verdicts": dict(verdicts),
        "first_refusal_after_s": first_refusal,
        "entries_at_end": len(guard),
        "horizon_lag_s": None if horizon is None or horizon == float("-inf") else end - horizon,
    }


def check_cost(entries: int, calls: int) -> dict[str, float]:
    """Mean microseconds per check, full and evicting vs. not full."""
    signatures = [signature(i) for i in range(entries + calls)]
    guard = ReplayGuard(window_seconds=WINDOW, max_entries=entries, repeat_grace_seconds=GRACE)
    per_second = max(1, entries // 500)
    started = time.perf_counter()
    for i in range(entries):
        now = START + i // per_second
        guard.check(signatures[i], int(now), now)
    filling = (time.perf_counter() - started) / entries
    started = time.perf_counter()
    for i in range(entries, entries + calls):
        now = START + i // per_second
        guard.check(signatures[i], int(now), now)
    full = (time.perf_counter() - started) / calls
    return {"not_full_us": round(filling * 1e6, 2), "full_us": round(full * 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=900)
    parser.add_argument("--calls", type=int, default=50_000)
    args = parser.parse_args()
    result = {
        "memory": memory(args.entries),
        "publisher": publisher(args.entries, args.rate, args.seconds),
        "check_us": check_cost(args.entries, args.calls),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
