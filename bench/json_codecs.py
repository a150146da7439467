"""JSON codecs on Bastion's own shapes: stdlib json vs orjson vs msgspec.

Feeds a decision record (issue #13): what a faster codec would save per frame, and
how each library treats the inputs Bastion's protocol layer must refuse or keep.
orjson and msgspec are *not* project dependencies; install them in the venv for the
measurement only (``pip install orjson msgspec``); a missing one is reported as such.

Codecs compared:

* ``stdlib``: ``json.loads`` / ``json.dumps(separators=(",", ":"), allow_nan=False)``
  plus ``.encode()`` (a frame is bytes);
* ``bastion``: the functions Bastion uses today, ``bastion.protocol.messages.loads``
  (stdlib with hooks refusing NaN/Infinity and overflowing floats), ``dumps`` (+
  ``.encode()``) and ``utf8_size``;
* ``orjson``: ``orjson.loads`` / ``orjson.dumps`` (bytes out);
* ``msgspec``: ``msgspec.json.Decoder().decode`` / ``Encoder().encode`` (bytes out).

Timings (``timeit``, best of ``--repeat``, ns per call): decoding typical client
frames (``pusher:subscribe`` with auth, presence subscribe with channel_data, a client
event with a small object, ``pusher:ping``, a REST trigger body) from ``str`` (what
Bastion's WebSocket layer hands over) and from ``bytes``; encoding ``channel_event``
frames with string data, object data and non-ASCII data; the UTF-8 size of event
data; and, for reference, Bastion's whole ``decode_client_message`` and its
depth walk.

Strictness (each case in its own subprocess, so a crash is seen as a crash):
duplicate keys, lone surrogate escapes, NaN/Infinity, huge numbers, 10,000-deep
nesting, invalid UTF-8, control characters, trailing data; and on encoding NaN,
lone surrogates, big integers, non-ASCII, non-string keys.

Prints ONE JSON object (``--markdown``: the two tables as Markdown instead;
``--from FILE`` renders a saved JSON result as Markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import timeit
from collections.abc import Callable
from typing import Any

LIBS = ("stdlib", "bastion", "orjson", "msgspec")

AUTH = "bench-key:" + "9f" * 32
SUBSCRIBE = json.dumps(
    {"event": "pusher:subscribe", "data": {"auth": AUTH, "channel": "private-chat-17"}},
    separators=(",", ":"),
)
PRESENCE = json.dumps(
    {
        "event": "pusher:subscribe",
        "data": {
            "auth": AUTH,
            "channel": "presence-room-3",
            "channel_data": json.dumps({"user_id": "u-1017", "user_info": {"name": "Ada"}}),
        },
    },
    separators=(",", ":"),
)
CLIENT_EVENT = (
    '{"event":"client-typing","channel":"private-chat-17",'
    '"data":{"t":1733550000123,"x":412,"y":187,"typing":true}}'
)
PING = '{"event":"pusher:ping","data":{}}'
REST_BODY = (
    '{"name":"order-updated","channels":["private-user-1017"],'
    '"data":"{\\"id\\":81723,\\"status\\":\\"shipped\\",\\"items\\":3}"}'
)
DECODE_SHAPES = {
    "subscribe_auth": SUBSCRIBE,
    "subscribe_presence": PRESENCE,
    "client_event_object": CLIENT_EVENT,
    "ping": PING,
    "rest_trigger_body": REST_BODY,
}
ENCODE_SHAPES: dict[str, dict[str, Any]] = {
    "channel_event_string_data": {
        "event": "order-updated",
        "channel": "private-user-1017",
        "data": '{"id":81723,"status":"shipped","items":3}',
    },
    "channel_event_object_data": {
        "event": "client-typing",
        "channel": "presence-room-3",
        "data": {"t": 1733550000123, "x": 412, "y": 187, "typing": True},
        "user_id": "u-1017",
    },
    "channel_event_non_ascii_data": {
        "event": "chat-message",
        "channel": "presence-room-3",
        "data": '{"text":"Grüße aus Köln — 東京からこんにちは 🎉"}',
    },
}
SIZE_SHAPES: dict[str, Any] = {
    "small_object": {"t": 1733550000123, "x": 412, "y": 187, "typing": True},
    "non_ascii_1k": {"text": "Grüße 東京 🎉 " * 60},
}


def codec(lib: str) -> tuple[Callable[[Any], Any], Callable[[Any], bytes], Callable[[Any], int]]:
    """(loads, dumps to bytes, utf8_size) of one library."""
    if lib == "stdlib":

        def s_dumps(v: Any) -> bytes:
            return json.dumps(v, separators=(",", ":"), allow_nan=False).encode()

        def s_size(v: Any) -> int:
            text = json.dumps(v, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
            return len(text.encode("utf-8", "surrogatepass"))

        return json.loads, s_dumps, s_size
    if lib == "bastion":
        from bastion.protocol import messages

        def b_dumps(v: Any) -> bytes:
            return messages.dumps(v).encode()

        return messages.loads, b_dumps, messages.utf8_size
    if lib == "orjson":
        import orjson

        def o_size(v: Any) -> int:
            return len(orjson.dumps(v))

        return orjson.loads, orjson.dumps, o_size
    if lib == "msgspec":
        import msgspec

        decoder = msgspec.json.Decoder()
        encoder = msgspec.json.Encoder()

        def m_size(v: Any) -> int:
            return len(encoder.encode(v))

        return decoder.decode, encoder.encode, m_size
    raise ValueError(lib)


def available(lib: str) -> str | None:
    """The library's version, or None when it is not installed."""
    try:
        if lib in ("stdlib", "bastion"):
            import bastion

            return platform.python_version() if lib == "stdlib" else bastion.__version__
        module = __import__(lib)
        return str(getattr(module, "__version__", "?"))
    except ImportError:
        return None


def ns_per_call(fn: Callable[[], Any], repeat: int) -> float:
    """Best of ``repeat`` timeit runs (each ~0.2 s or 1,000 calls), in ns per call."""
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(number, 1000)
    return round(min(timer.repeat(repeat, number)) / number * 1e9, 1)


def timings(libs: list[str], repeat: int) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    codecs = {lib: codec(lib) for lib in libs}
    for shape, text in DECODE_SHAPES.items():
        data = text.encode()
        for src, value in (
            (f"decode_{shape}_from_str", text),
            (f"decode_{shape}_from_bytes", data),
        ):
            out[src] = {
                lib: ns_per_call(lambda f=codecs[lib][0], v=value: f(v), repeat) for lib in libs
            }
    for shape, value in ENCODE_SHAPES.items():
        out[f"encode_{shape}"] = {
            lib: ns_per_call(lambda f=codecs[lib][1], v=value: f(v), repeat) for lib in libs
        }
    for shape, value in SIZE_SHAPES.items():
        out[f"utf8_size_{shape}"] = {
            lib: ns_per_call(lambda f=codecs[lib][2], v=value: f(v), repeat) for lib in libs
        }
    if "bastion" in libs:
        from bastion.protocol import messages

        frame = json.loads(CLIENT_EVENT)
        out["reference_bastion_decode_client_message_client_event"] = {
            "bastion": ns_per_call(lambda: messages.decode_client_message(CLIENT_EVENT), repeat)
        }
        out["reference_bastion_depth_walk_client_event"] = {
            "bastion": ns_per_call(
                lambda: messages._depth_exceeds(frame, messages.MAX_JSON_DEPTH), repeat
            )
        }
    return out


# --- strictness ---------------------------------------------------------------------


def _nested(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


DECODE_CASES: dict[str, Callable[[], bytes]] = {
    "duplicate_keys": lambda: b'{"event":"pusher:ping","event":"client-x","data":{}}',
    "lone_surrogate_escape": lambda: b'{"data":"\\ud800"}',
    "escaped_surrogate_pair (valid)": lambda: b'{"data":"\\ud83c\\udf89"}',
    "NaN": lambda: b'{"x":NaN}',
    "Infinity": lambda: b'{"x":Infinity}',
    "minus_Infinity": lambda: b'{"x":-Infinity}',
    "float_1e400": lambda: b'{"x":1e400}',
    "int_2**64": lambda: b'{"x":18446744073709551616}',
    "int_5000_digits": lambda: b'{"x":' + b"9" * 5000 + b"}",
    "depth_10000_arrays": lambda: _nested(10_000, "array"),
    "depth_10000_objects": lambda: _nested(10_000, "object"),
    "depth_1000000_arrays": lambda: _nested(1_000_000, "array"),
    "invalid_utf8_bytes": lambda: b'{"data":"\xff\xfe"}',
    "utf8_encoded_surrogate": lambda: b'{"data":"\xed\xa0\x80"}',
    "unescaped_control_char": lambda: b'{"data":"a\x01b"}',
    "trailing_comma": lambda: b'{"a":1,}',
    "trailing_data": lambda: b'{"a":1} x',
    "utf8_bom": lambda: b'\xef\xbb\xbf{"a":1}',
}
ENCODE_CASES: dict[str, Callable[[], Any]] = {
    "encode_NaN": lambda: {"x": float("nan")},
    "encode_Infinity": lambda: {"x": float("inf")},
    "encode_lone_surrogate": lambda: {"data": "\ud800"},
    "encode_int_2**64": lambda: {"x": 2**64},
    "encode_non_ascii": lambda: {"data": "é東🎉"},
    "encode_non_str_key": lambda: {1: "a"},
}


def _describe(value: Any) -> str:
    if isinstance(value, bytes):
        return f"-> {value[:60]!r}"
    if isinstance(value, dict) and "x" in value and isinstance(value["x"], (int, float)):
        x = value["x"]
        if isinstance(x, int) and x.bit_length() > 80:
            return f"-> int of {len(str(x)) if x.bit_length() < 14000 else '>4000'} digits"
        return f"-> {type(x).__name__} {x!r}"
    text = repr(value)
    return f"-> {text[:50]}{'...' if len(text) > 50 else ''}"


def run_case(lib: str, case: str) -> dict[str, str]:
    """In a subprocess: one library, one case."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    loads, dumps, _size = codec(lib)
    if case in DECODE_CASES:
        raw = DECODE_CASES[case]()
        # Bastion's WebSocket layer hands text frames over as str (already valid UTF-8),
        # its REST API passes the body as bytes: stdlib and bastion get the str when the
        # bytes decode strictly, else the bytes (which json.loads decodes with
        # "surrogatepass": UTF-8-encoded surrogates get through that way).
        arg: Any = raw
        if lib in ("stdlib", "bastion"):
            try:
                arg = raw.decode("utf-8")
            except UnicodeDecodeError:
                arg = raw
        try:
            value = loads(arg)
        except BaseException as exc:
            return {"outcome": "refuses", "detail": f"{type(exc).__name__}: {exc}"[:120]}
        if case == "lone_surrogate_escape" and isinstance(value, dict):
            s = value.get("data", "")
            return {"outcome": "accepts", "detail": f"-> str {s!r} (lone surrogate kept)"}
        return {"outcome": "accepts", "detail": _describe(value)}
    value = ENCODE_CASES[case]()
    try:
        out = dumps(value)
    except BaseException as exc:
        return {"outcome": "refuses", "detail": f"{type(exc).__name__}: {exc}"[:120]}
    return {"outcome": "accepts", "detail": f"-> {out[:60]!r}"}


def strictness(libs: list[str]) -> dict[str, dict[str, dict[str, str]]]:
    out: dict[str, dict[str, dict[str, str]]] = {}
    for case in list(DECODE_CASES) + list(ENCODE_CASES):
        out[case] = {}
        for lib in libs:
            try:
                proc = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--case", lib, case],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            except subprocess.TimeoutExpired:
                out[case][lib] = {"outcome": "hangs", "detail": "no answer in 60 s"}
                continue
            if proc.returncode < 0:
                out[case][lib] = {
                    "outcome": "CRASHES",
                    "detail": f"killed by signal {-proc.returncode}",
                }
            elif proc.returncode != 0 or not proc.stdout.strip():
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                out[case][lib] = {
                    "outcome": "CRASHES",
                    "detail": f"exit {proc.returncode}: {tail[:100]}",
                }
            else:
                out[case][lib] = json.loads(proc.stdout)
    return out


def markdown(result: dict[str, Any]) -> str:
    libs = [lib for lib in LIBS if result["versions"].get(lib)]
    lines = ["| ns per call | " + " | ".join(libs) + " |", "|---" * (len(libs) + 1) + "|"]
    for name, row in result["timings_ns"].items():
        cells = [f"{row[lib]:,.0f}" if row.get(lib) is not None else "" for lib in libs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| case | " + " | ".join(libs) + " |", "|---" * (len(libs) + 1) + "|"]
    for case, row in result["strictness"].items():
        cells = [f"{row[lib]['outcome']} {row[lib]['detail']}".replace("|", "\\|") for lib in libs]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="timeit repetitions (best is kept)")
    ap.add_argument("--no-strictness", dest="strict", action="store_false")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables, not JSON")
    ap.add_argument("--wait-idle", type=float, default=0.0, help="wait for this idle share")
    ap.add_argument("--wait-max", type=float, default=300.0, help="longest such wait, seconds")
    ap.add_argument("--from", dest="saved", help="render this saved JSON result as Markdown")
    ap.add_argument("--case", nargs=2, metavar=("LIB", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(*args.case)))
        return
    if args.saved:
        with open(args.saved) as f:
            print(markdown(json.load(f)))
        return
    quiet: dict[str, Any] = {}
    if args.wait_idle > 0:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _common import wait_for_quiet

        quiet = wait_for_quiet(args.wait_idle, args.wait_max)
    versions = {lib: available(lib) for lib in LIBS}
    libs = [lib for lib in LIBS if versions[lib]]
    result: dict[str, Any] = {
        "bench": "json_codecs",
        "versions": versions,
        "python": platform.python_version(),
        "timings_ns": timings(libs, args.repeat),
    }
    if args.strict:
        result["strictness"] = strictness(libs)
    result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    result.update(quiet)
    print(markdown(result) if args.markdown else json.dumps(result))


if __name__ == "__main__":
    main()
