"""bastion.logs: one redacting handler, console and JSON lines, per-logger levels.

Records carrying credentials are logged on non-``bastion`` loggers (third-party
names and ``tests.logs``): the session's hygiene tap reads the ``bastion`` loggers
before any redaction, as a last line of defence for the server's own records.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import re
import warnings
from collections.abc import Callable, Iterator

import pytest

from bastion import logs
from bastion.metrics import Metrics
from bastion.protocol.refusals import Reason
from bastion.server.refusals import RefusalPath

SIGNATURE = hmac.new(b"k", b"GET\n/apps/1/events\nauth_key=x", hashlib.sha256).hexdigest()
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJlLWJ5dGVzLWhlcmU"

#: name -> (text logged, the secret part that must not be written).
SHAPES = {
    "auth_signature-param": (f"GET /apps/1/events?auth_signature={SIGNATURE}&x=1", SIGNATURE),
    "auth-param": ("subscribe auth=app-key:not-hex-but-secret", "not-hex-but-secret"),
    "token-param": ("url https://hook/x?token=tok-s3cr3t-value", "tok-s3cr3t-value"),
    "secret-param": ("config secret=hunter2-hunter2", "hunter2-hunter2"),
    "password-param": ("redis password=pa55w0rd-long", "pa55w0rd-long"),
    "key-hex-auth": (f"channel auth app-key:{SIGNATURE[:40]} refused", SIGNATURE[:40]),
    "bare-hex64": (f"digest {SIGNATURE} seen", SIGNATURE),
    "jwt": (f"bearer {JWT} expired", JWT),
}

Configure = Callable[..., io.StringIO]


@pytest.fixture
def configure() -> Iterator[Configure]:
    """``logs.configure`` writing to a buffer; the root logger is restored afterwards."""
    root = logging.getLogger()
    before = list(root.handlers)
    touched: dict[str, int] = {}
    previous_root = root.level

    def run(
        level: str = "info",
        fmt: logs.LogFormat = "console",
        levels: dict[str, str] | None = None,
        worker: int | None = None,
    ) -> io.StringIO:
        for name in levels or {}:
            touched.setdefault(name, logging.getLogger(name).level)
        buffer = io.StringIO()
        logs.configure(level, fmt, levels or {}, worker, stream=buffer)
        return buffer

    try:
        yield run
    finally:
        for handler in root.handlers[:]:
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(previous_root)
        for name, level in touched.items():
            logging.getLogger(name).setLevel(level)
        logging.captureWarnings(False)


def lines(buffer: io.StringIO) -> list[str]:
    return buffer.getvalue().splitlines()


def json_lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines(buffer)]


# --- formats -----------------------------------------------------------------------------


def test_console_line_keeps_the_previous_format(configure: Configure) -> None:
    out = configure()
    logging.getLogger("tests.logs").info("hello %s", "world")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tests\.logs hello world", lines(out)[0]
    )


def test_console_line_of_a_worker_carries_its_index(configure: Configure) -> None:
    out = configure(worker=3)
    logging.getLogger("tests.logs").warning("hi")
    assert re.fullmatch(r"\S+ \S+ WARNING \[worker 3\] tests\.logs hi", lines(out)[0])


def test_json_line_has_time_level_logger_message(configure: Configure) -> None:
    out = configure(fmt="json")
    logging.getLogger("tests.logs").error("hello %d", 5)
    (line,) = json_lines(out)
    assert set(line) == {"time", "level", "logger", "message"}
    assert line["level"] == "ERROR"
    assert line["logger"] == "tests.logs"
    assert line["message"] == "hello 5"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(line["time"]))


def test_json_line_of_a_worker_carries_its_index(configure: Configure) -> None:
    out = configure(fmt="json", worker=1)
    logging.getLogger("tests.logs").info("hi")
    assert json_lines(out)[0]["worker"] == 1


def test_json_line_carries_extra_fields_redacted(configure: Configure) -> None:
    out = configure(fmt="json")
    logging.getLogger("tests.logs").info(
        "hi",
        extra={"count": 3, "ok": True, "none": None, "url": f"/x?auth_signature={SIGNATURE}"},
    )
    (line,) = json_lines(out)
    assert line["count"] == 3 and line["ok"] is True and line["none"] is None
    assert line["url"] == "/x?auth_signature=[redacted]"
    assert SIGNATURE not in out.getvalue()


def test_json_extra_cannot_replace_the_core_fields(configure: Configure) -> None:
    out = configure(fmt="json")
    logging.getLogger("tests.logs").info("hi", extra={"level": "FAKE", "logger": "x"})
    (line,) = json_lines(out)
    assert line["level"] == "INFO" and line["logger"] == "tests.logs"


def test_refusal_line_keeps_its_text_and_carries_fields(configure: Configure) -> None:
    out = configure(fmt="json")
    RefusalPath(Metrics()).record(
        Reason.SIGNIN_INVALID, app_id="12345", ip="192.0.2.1", socket_id="1.2"
    )
    (line,) = json_lines(out)
    assert line["logger"] == "bastion.refusals"
    assert line["level"] == "WARNING"
    assert str(line["message"]).startswith(
        "refused reason=signin_invalid app=12345 ip=192.0.2.1 socket=1.2 detail="
    )
    assert line["reason"] == "signin_invalid"
    assert (line["app_id"], line["ip"], line["socket_id"]) == ("12345", "192.0.2.1", "1.2")


# --- redaction ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["console", "json"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_credential_shape_is_redacted(configure: Configure, fmt: str, shape: str) -> None:
    text, secret = SHAPES[shape]
    out = configure(fmt=fmt)
    logging.getLogger("tests.logs").info("seen: %s", text)
    assert secret not in out.getvalue()
    assert "[redacted]" in out.getvalue()
    if fmt == "json":
        assert "[redacted]" in str(json_lines(out)[0]["message"])


@pytest.mark.parametrize("fmt", ["console", "json"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_exception_tracebacks_are_redacted(configure: Configure, fmt: str, shape: str) -> None:
    text, secret = SHAPES[shape]
    out = configure(fmt=fmt)
    try:
        raise ValueError(text)
    except ValueError:
        logging.getLogger("tests.logs").exception("request failed")
    written = out.getvalue()
    assert "Traceback" in written and "ValueError" in written
    assert secret not in written
    if fmt == "json":
        (line,) = json_lines(out)
        assert "ValueError: " in str(line["exc"])
        assert "[redacted]" in str(line["exc"])


@pytest.mark.parametrize("fmt", ["console", "json"])
@pytest.mark.parametrize("name", ["websockets.server", "httpx", "redis.connection", "asyncio"])
def test_third_party_loggers_are_redacted(configure: Configure, fmt: str, name: str) -> None:
    out = configure(fmt=fmt)
    logging.getLogger(name).warning("GET /apps/1/events?auth_signature=%s&token=%s", SIGNATURE, JWT)
    written = out.getvalue()
    assert name in written
    assert SIGNATURE not in written and JWT not in written


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_a_record_with_bad_arguments_still_yields_one_redacted_line(
    configure: Configure, fmt: logs.LogFormat, capsys: pytest.CaptureFixture[str]
) -> None:
    configure()  # the fixture's clean-up
    out = io.StringIO()
    # Handled directly: pytest's own capture handler re-raises the formatting error.
    handler = logs.configure("info", fmt, stream=out)
    log = logging.getLogger("tests.logs")
    bad = f"auth_signature={SIGNATURE} value=%d"
    handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 1, bad, ("nan", 1), None))
    handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 2, "next", (), None))
    written = lines(out)
    assert len(written) == 2
    assert "log arguments could not be formatted: TypeError" in written[0]
    assert "auth_signature=[redacted]" in written[0]
    assert "nan" not in written[0]  # arguments are never written raw
    assert SIGNATURE not in out.getvalue()
    # logging's own error report (which quotes the record) was never triggered.
    assert "Logging error" not in capsys.readouterr().err
    if fmt == "json":
        assert [line["message"] for line in json_lines(out)][1] == "next"


def test_warnings_go_through_the_handler(configure: Configure) -> None:
    out = configure(fmt="json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)  # catch_warnings restored showwarning on entry
        warnings.warn(f"leaky token={JWT}", UserWarning, stacklevel=1)
    (line,) = json_lines(out)
    assert line["logger"] == "py.warnings"
    assert JWT not in out.getvalue()


# --- levels ------------------------------------------------------------------------------


def test_per_logger_levels_apply(configure: Configure) -> None:
    out = configure(
        level="info",
        fmt="json",
        levels={"tests.quiet": "error", "tests.loud": "debug"},
    )
    logging.getLogger("tests.quiet.child").warning("dropped")
    logging.getLogger("tests.quiet").error("kept error")
    logging.getLogger("tests.loud").debug("kept debug")
    logging.getLogger("tests.other").debug("dropped debug")
    logging.getLogger("tests.other").info("kept info")
    assert [line["message"] for line in json_lines(out)] == [
        "kept error",
        "kept debug",
        "kept info",
    ]


def test_configure_replaces_its_own_handler(configure: Configure) -> None:
    first = configure()
    second = configure(fmt="json")
    logging.getLogger("tests.logs").info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1
    ours = [
        h for h in logging.getLogger().handlers if h.formatter.__class__.__module__ == logs.__name__
    ]
    assert len(ours) == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda: logs.configure("loud", "console"),
        lambda: logs.configure("info", "xml"),  # type: ignore[arg-type]
        lambda: logs.configure("info", "console", {"x": "verbose"}),
    ],
)
def test_configure_rejects_unknown_levels_and_formats(call: Callable[[], object]) -> None:
    handlers = list(logging.getLogger().handlers)
    level = logging.getLogger().level
    with pytest.raises(ValueError):
        call()
    assert logging.getLogger().handlers == handlers
    assert logging.getLogger().level == level


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("websockets=error", ("websockets", "error")),
        (" bastion.refusals = WARNING ", ("bastion.refusals", "warning")),
    ],
)
def test_parse_level_for(text: str, expected: tuple[str, str]) -> None:
    assert logs.parse_level_for(text) == expected


@pytest.mark.parametrize("text", ["websockets", "=error", "websockets=loud"])
def test_parse_level_for_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        logs.parse_level_for(text)
