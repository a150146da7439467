"""Self-tests of the test harness: if these fail, every server test is suspect."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request

import pytest

from support.server import (
    DEFAULT_CONFIG_TOML,
    SRC_DIR,
    BastionStartupError,
    app_spec,
    config_toml,
    render_toml,
    run_bastion,
    run_bastion_cli,
)
from support.signing import channel_auth, signed_rest_request, user_auth
from support.timeouts import ENV_VAR, scaled, until, within


def test_scaled_defaults_to_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert scaled(2.5) == 2.5


def test_scaled_multiplies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "3")
    assert scaled(2) == 6


@pytest.mark.parametrize("bad", ["0", "-1", "abc", "inf", "nan"])
def test_scaled_rejects_nonsense(monkeypatch: pytest.MonkeyPatch, bad: str) -> None:
    monkeypatch.setenv(ENV_VAR, bad)
    with pytest.raises(ValueError, match=ENV_VAR):
        scaled(1)


async def test_until_returns_once_a_sync_or_async_condition_holds() -> None:
    calls: list[int] = []

    def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    async def ready() -> bool:
        return len(calls) >= 3

    await until(third_time)
    await until(ready)
    assert len(calls) == 3


async def test_until_fails_with_the_message_at_the_deadline() -> None:
    with pytest.raises(AssertionError, match="never true"):
        await until(lambda: False, 0.05, message="never true")
    with pytest.raises(AssertionError, match="described late: 7"):
        await until(lambda: False, 0.05, message=lambda: f"described late: {7}")


async def test_until_cancels_a_condition_still_running_at_the_deadline() -> None:
    cancelled = asyncio.Event()

    async def hangs() -> bool:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return True

    with pytest.raises(AssertionError):
        await until(hangs, 0.05)
    assert cancelled.is_set()


async def test_within_raises_timeout_error() -> None:
    assert await within(asyncio.sleep(0, "done")) == "done"
    with pytest.raises(TimeoutError):
        await within(asyncio.Event().wait(), 0.01)


def test_default_config_is_the_documented_one() -> None:
    assert config_toml() == DEFAULT_CONFIG_TOML
    parsed = tomllib.loads(DEFAULT_CONFIG_TOML)
    assert parsed["server"] == {"host": "127.0.0.1", "port": 0, "activity_timeout": 120}
    assert parsed["apps"][0]["key"] == "app-key"


def test_render_toml_round_trips_nested_apps_and_webhooks() -> None:
    webhooks = [{"url": "http://127.0.0.1:9/hook", "event_types": ["channel_occupied"]}]
    text = config_toml(
        apps=[app_spec(max_connections=5, webhooks=webhooks), app_spec(id="2", key="k2")],
        server={"pong_timeout": 7, "activity_timeout": None},
        adapter={"driver": "local"},
    )
    parsed = tomllib.loads(text)
    assert parsed["server"] == {"host": "127.0.0.1", "port": 0, "pong_timeout": 7}
    assert parsed["adapter"] == {"driver": "local"}
    assert parsed["apps"][0]["max_connections"] == 5
    assert parsed["apps"][0]["webhooks"] == webhooks
    assert parsed["apps"][1]["id"] == "2"
    assert parsed["apps"][1]["enable_client_messages"] is True


def test_render_toml_escapes_strings() -> None:
    value = 'quote " backslash \\ newline \n tab \t unicode é'
    assert tomllib.loads(render_toml({"s": value, "odd key": 1})) == {"s": value, "odd key": 1}


def test_signing_vectors_from_the_spec() -> None:
    # pusher-protocol.md §8.4 and §15.2.
    key, secret, socket = "278d425bdf160c739803", "7ad3773142a6692b25b8", "1234.1234"
    assert channel_auth(key, secret, socket, "private-foobar") == (
        f"{key}:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
    )
    assert user_auth(key, secret, socket, '{"id":"12345"}') == (
        f"{key}:4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba"
    )
    body = '{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
    path_q, raw = signed_rest_request(
        method="POST",
        path="/apps/3/events",
        key=key,
        secret=secret,
        body=body,
        timestamp=1353088179,
    )
    assert raw == body.encode()
    assert "body_md5=ec365a775a4cd0599faeb73354201b6f" in path_q
    assert path_q.endswith(
        "auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
    )


def test_server_starts_reports_its_port_and_stops_on_sigterm(bastion) -> None:
    assert bastion.is_running()
    assert bastion.port > 0
    assert bastion.http_url == f"http://127.0.0.1:{bastion.port}"
    assert bastion.ws_url("app-key", query=None) == f"ws://127.0.0.1:{bastion.port}/app/app-key"
    assert f"bastion listening on {bastion.http_url}" in bastion.stdout_text
    # One served request proves the event loop is past start-up (signal handlers set).
    with contextlib.suppress(urllib.error.HTTPError):  # any HTTP answer will do
        urllib.request.urlopen(f"{bastion.http_url}/", timeout=scaled(10)).close()

    assert bastion.stop() == 0, "SIGTERM drains and exits 0"
    assert not bastion.is_running()
    assert bastion.stop() == 0  # idempotent


def _prefilled_pipe() -> tuple[int, int]:
    """A pipe whose buffer is already full: the next write to it blocks."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_fd, b"x" * 4096)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_fd, b"x")
    os.set_blocking(write_fd, True)
    return read_fd, write_fd


def _blocked_writing_stdout(pid: int) -> bool:
    # /proc/PID/syscall: "1 0x1 ..." is write(fd=1, ...) on x86-64 ("64 0x1" on arm64).
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] in ("1", "64") and fields[1] == "0x1"


def _read_until_eof(fd: int, timeout: float) -> bytes:
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the server kept its stdout open")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


@pytest.mark.skipif(not os.path.exists("/proc/self/syscall"), reason="needs /proc/PID/syscall")
def test_sigterm_right_after_the_listening_line_still_drains(tmp_path) -> None:
    # A supervisor (or a test) may stop the server the moment it says it is listening.
    # Made deterministic: stdout is a full pipe, so the server blocks *inside* printing
    # the listening line; SIGTERM arrives exactly then, and only afterwards is the pipe
    # drained. A server that installs its handlers before announcing itself drains (0).
    config = tmp_path / "bastion.toml"
    config.write_text(DEFAULT_CONFIG_TOML)
    read_fd, write_fd = _prefilled_pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC_DIR), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bastion", "serve", "--config", str(config)],
        cwd=str(tmp_path),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=write_fd,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    try:
        deadline = time.monotonic() + scaled(20)
        while not _blocked_writing_stdout(proc.pid):
            assert proc.poll() is None, f"server exited early ({proc.returncode})"
            assert time.monotonic() < deadline, "server never tried to print its listening line"
            time.sleep(0.01)  # polling /proc for a state, not synchronising with events

        os.kill(proc.pid, signal.SIGTERM)
        output = _read_until_eof(read_fd, scaled(15))  # unblocks the server's write
        code = proc.wait(scaled(15))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(scaled(5))
        os.close(read_fd)

    assert code == 0, f"SIGTERM while printing the listening line: exit {code}"
    assert b"bastion listening on http://127.0.0.1:" in output


def test_two_servers_get_different_ports(make_bastion) -> None:
    assert make_bastion().port != make_bastion().port


def test_invalid_config_is_reported_with_the_server_output(tmp_path) -> None:
    with pytest.raises(BastionStartupError) as excinfo:
        run_bastion("[server]\nport = 'not a port'\n", tmp_path)

    assert excinfo.value.returncode == 2
    assert excinfo.value.stderr.strip(), "the refusal is explained on stderr"


def test_run_bastion_cli_invalid_config_exits_2(tmp_path) -> None:
    result = run_bastion_cli(
        ["serve", "--config", "{config}"],
        cwd=tmp_path,
        config_toml_text=config_toml(apps=[app_spec(key=None)]),
    )

    assert result.returncode == 2, result
    assert "key" in result.stderr
