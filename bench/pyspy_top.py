"""Top self-time functions from a py-spy ``--format raw`` (collapsed stacks) profile.

    py-spy record -r 200 -d 14 --format raw -o /tmp/ce.raw --pid PID
    python bench/pyspy_top.py /tmp/ce.raw [--top 20] [--json]

Self time of a function is the share of samples in which it is the innermost frame
(``file:line`` collapsed to the function, ``--lines`` keeps lines apart). Also prints
the inclusive share (samples in which the function is anywhere on the stack).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter

_LINE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def frame_name(frame: str, lines: bool) -> str:
    m = _LINE.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "src/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3.":
                path = "stdlib:" + path.split("/", 1)[-1]
            break
    where = f"{path}:{m['line']}" if lines and m["line"] else path
    return f"{m['func']} ({where})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", help="py-spy --format raw output")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--lines", action="store_true", help="keep line numbers apart")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with open(args.raw) as f:
        for row in f:
            stack, _, count = row.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            total += n
            frames = [frame_name(fr, args.lines) for fr in stack.split(";")]
            self_time[frames[-1]] += n
            for name in set(frames):
                inclusive[name] += n
    rows = [
        {
            "function": name,
            "self_pct": round(100 * n / total, 1),
            "inclusive_pct": round(100 * inclusive[name] / total, 1),
        }
        for name, n in self_time.most_common(args.top)
    ]
    if args.json:
        print(json.dumps({"samples": total, "top_self": rows}))
        return
    print(f"{total} samples")
    print(f"{'self %':>7} {'incl %':>7}  function")
    for r in rows:
        print(f"{r['self_pct']:7.1f} {r['inclusive_pct']:7.1f}  {r['function']}")


if __name__ == "__main__":
    main()
