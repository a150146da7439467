"""Run the ``bastion`` command with every garbage collection of its process timed.

Bench-only launcher (nothing in ``src/`` knows about it)::

    BENCH_GC_PROBE_FILE=/tmp/gc.jsonl python bench/_gc_probe.py serve --config FILE

It adds a ``gc.callbacks`` hook that times each collection (``start`` to ``stop``,
``time.perf_counter``, the clock every benchmark process shares), then runs
``bastion.cli.main`` in this same process, so the collections timed are the
server's own. It appends JSON lines to the file:

* ``{"kind": "start", "pid", "t", "thresholds", "python"}`` once;
* ``{"kind": "interval", "t0", "t1", "gen": {"0": [count, total_ms, max_ms], ...},
  "long": [[t, generation, ms, collected], ...], "counts"}`` at most once a second,
  written right after a collection ends (never inside the timed part): the
  collections of the interval by generation, and each one of at least
  ``BENCH_GC_PROBE_LONG_MS`` (default 1.0) individually;
* the same for the last partial interval at exit (atexit: the server drains and
  exits normally on SIGTERM).

Its own cost: two Python calls per collection and one short write a second.
"""

from __future__ import annotations

import atexit
import gc
import json
import os
import platform
import sys
import time

_PATH = os.environ.get("BENCH_GC_PROBE_FILE", "")
_LONG_S = float(os.environ.get("BENCH_GC_PROBE_LONG_MS", "1.0")) / 1000


class _Probe:
    def __init__(self, path: str) -> None:
        self.out = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        self.started = 0.0
        self.t0 = time.perf_counter()
        self.gen: dict[int, list[float]] = {}
        self.long: list[list[float]] = []
        self.write(
            {
                "kind": "start",
                "pid": os.getpid(),
                "t": self.t0,
                "thresholds": gc.get_threshold(),
                "python": platform.python_version(),
            }
        )

    def write(self, line: dict[str, object]) -> None:
        self.out.write(json.dumps(line, separators=(",", ":")) + "\n")

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        now = time.perf_counter()
        took = now - self.started
        g = info["generation"]
        stat = self.gen.get(g)
        if stat is None:
            self.gen[g] = [1, took, took]
        else:
            stat[0] += 1
            stat[1] += took
            if took > stat[2]:
                stat[2] = took
        if took >= _LONG_S:
            self.long.append([round(self.started, 6), g, round(took * 1000, 3), info["collected"]])
        if now - self.t0 >= 1.0:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.gen:
            self.write(
                {
                    "kind": "interval",
                    "t0": round(self.t0, 6),
                    "t1": round(now, 6),
                    "gen": {
                        str(g): [int(s[0]), round(s[1] * 1000, 3), round(s[2] * 1000, 3)]
                        for g, s in sorted(self.gen.items())
                    },
                    "long": self.long,
                    "counts": gc.get_count(),
                }
            )
        self.t0 = now
        self.gen = {}
        self.long = []


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    # Run as a script, bench/ is first on sys.path: keep its modules out of the server's.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    if _PATH:
        probe = _Probe(_PATH)
        gc.callbacks.append(probe)
        atexit.register(probe.flush)
    from bastion.cli import main as bastion_main

    bastion_main(args=sys.argv[1:], prog_name="bastion")


if __name__ == "__main__":
    main()
