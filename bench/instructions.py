"""Instructions per unit of an in-process benchmark, counted by Valgrind: steady on a busy box.

The in-process benchmarks (``front_door.py``, ``message_path.py``) time CPU, and on
a shared two-core VM that moves by 20-30 % between runs: too much to see a change
of a few per cent. This runs one case of one of them under ``valgrind
--tool=callgrind`` twice, with ``--small`` and ``--large`` units (one round each),
and divides the difference of the instructions executed by the difference of the
units: start-up, imports and set-up cancel out, what remains is the instructions
one unit costs. The count does not depend on what else the machine runs (it is
not a time: cache misses and system calls count as the instructions they execute
in user space, nothing more), so two checkouts compare within a fraction of a
per cent. ``--src`` points at another checkout's ``src`` to compare against.

Needs ``valgrind`` (Debian package ``valgrind``). Each run takes a minute or two
(Python under callgrind runs ~50x slower); both sizes run at once.

    python bench/instructions.py front_door trigger [--small 200 --large 1200] [--src DIR]
    python bench/instructions.py message_path connect

Prints one JSON line: the bench, the case, both counts and ``instructions_per_unit``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The flag each benchmark takes for its unit count.
UNIT_FLAG = {"front_door": "--requests", "message_path": "--messages"}
_COLLECTED = re.compile(rb"Collected : (\d+)")


def _run(bench: str, case: str, units: int, src: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        str(HERE / f"{bench}.py"),
        "--case",
        case,
        UNIT_FLAG[bench],
        str(units),
        "--repeat",
        "1",
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _collected(process: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise SystemExit("valgrind run timed out") from None
    found = _COLLECTED.search(stderr)
    if process.returncode != 0 or found is None:
        raise SystemExit(stderr.decode(errors="replace")[-2000:])
    return int(found.group(1))


def main(argv: list[str] | None = None) -> None:
    """Count, then print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", choices=sorted(UNIT_FLAG))
    parser.add_argument("case")
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=1200)
    parser.add_argument("--src", help="another checkout's src directory to measure")
    parser.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    if args.large <= args.small:
        raise SystemExit("--large must exceed --small")
    small = _run(args.bench, args.case, args.small, args.src)
    large = _run(args.bench, args.case, args.large, args.src)
    counts = (_collected(small, args.timeout), _collected(large, args.timeout))
    result = {
        "bench": args.bench,
        "case": args.case,
        "src": args.src or "installed",
        "units": [args.small, args.large],
        "instructions": list(counts),
        "instructions_per_unit": round((counts[1] - counts[0]) / (args.large - args.small)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
