"""Interop fixtures: Node + pusher-js + the Node ``pusher`` SDK, and the PyPI ``pusher`` SDK.

Node-based tests skip (with a clear message) only when ``node`` is not installed. If
``tests/interop/node_modules`` is missing, ``npm ci`` is run once per session (CI also
runs ``npm ci --prefix tests/interop`` beforehand); an npm failure fails the tests —
it is never silently skipped.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pusher
import pytest
from support.server import DEFAULT_APP, DEFAULT_CONFIG_TOML, BastionProcess, config_toml
from support.timeouts import scaled

from .node_driver import INTEROP_DIR, NodeDriver

REQUIRED_NODE_PACKAGES = ("pusher-js", "pusher", "tweetnacl", "playwright-core")
MIN_NODE_MAJOR = 18


def _node_modules_complete() -> bool:
    return all(
        (INTEROP_DIR / "node_modules" / name / "package.json").is_file()
        for name in REQUIRED_NODE_PACKAGES
    )


@pytest.fixture(scope="session")
def node_bin() -> str:
    """Path of ``node``; skips the Node-based tests if it is not installed."""
    node = shutil.which("node")
    if node is None:
        pytest.skip(
            "node is not installed: the pusher-js / Node SDK interop tests need Node >= 18 on PATH"
        )
    out = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=scaled(30), check=False
    )
    match = re.match(r"v(\d+)\.", out.stdout.strip())
    if not match or int(match.group(1)) < MIN_NODE_MAJOR:
        pytest.fail(
            f"node {out.stdout.strip() or '?'} is too old: "
            f"interop tests need Node >= {MIN_NODE_MAJOR}"
        )
    return node


@pytest.fixture(scope="session")
def node_modules(node_bin: str) -> Path:
    """``tests/interop/node_modules``, installed with ``npm ci`` (lock file) if missing."""
    if not _node_modules_complete():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail(
                "tests/interop/node_modules is missing and npm is not installed to run `npm ci`"
            )
        try:
            result = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=str(INTEROP_DIR),
                capture_output=True,
                text=True,
                timeout=scaled(300),
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("`npm ci` in tests/interop did not finish in time")
        if result.returncode != 0 or not _node_modules_complete():
            pytest.fail(
                f"`npm ci` in tests/interop failed ({result.returncode}):\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
    return INTEROP_DIR / "node_modules"


#: ``BASTION_INTEROP_HISTORY=1``: the default server's app records history on every
#: channel, so the whole suite proves that pusher-js without the recovery add-on and
#: the official SDKs see nothing new on such an app (docs/recovery.md).
HISTORY_EVERYWHERE = os.environ.get("BASTION_INTEROP_HISTORY") == "1"


@pytest.fixture
def bastion(make_bastion: Callable[..., BastionProcess]) -> BastionProcess:
    """The default server (with history on every channel under BASTION_INTEROP_HISTORY=1)."""
    if HISTORY_EVERYWHERE:
        return make_bastion(config_toml(apps=[{**DEFAULT_APP, "history": {}}]))
    return make_bastion(DEFAULT_CONFIG_TOML)


@pytest.fixture
def master_key_b64() -> str:
    """A fresh 32-byte end-to-end encryption master key (base64), as the SDKs expect."""
    return base64.b64encode(os.urandom(32)).decode("ascii")


@pytest.fixture
def make_driver(
    node_bin: str, node_modules: Path, make_bastion: Callable[..., BastionProcess]
) -> Iterator[Callable[..., NodeDriver]]:
    """Factory: a Node driver process pointed at a Bastion; all stopped at teardown.

    Depends on ``make_bastion`` so the drivers stop *before* the servers (otherwise
    pusher-js would see a drain and start reconnecting during teardown).
    """
    drivers: list[NodeDriver] = []

    def factory(
        server: BastionProcess,
        *,
        app: dict[str, Any] | None = None,
        master_key_b64: str | None = None,
    ) -> NodeDriver:
        credentials = dict(app or DEFAULT_APP)
        driver = NodeDriver(node_bin)
        drivers.append(driver)
        driver.init(
            port=server.port,
            app_id=str(credentials["id"]),
            key=str(credentials["key"]),
            secret=str(credentials["secret"]),
            master_key_b64=master_key_b64,
        )
        return driver

    try:
        yield factory
    finally:
        for driver in drivers:
            try:
                driver.stop()
            finally:
                print("\n===== node driver =====")
                print(driver.describe())


@pytest.fixture
def driver(
    make_driver: Callable[..., NodeDriver], bastion: BastionProcess, master_key_b64: str
) -> NodeDriver:
    """A Node driver attached to the default ``bastion`` server."""
    return make_driver(bastion, master_key_b64=master_key_b64)


def make_py_pusher(
    server: BastionProcess,
    *,
    app: dict[str, Any] | None = None,
    master_key_b64: str | None = None,
    **overrides: Any,
) -> pusher.Pusher:
    """The PyPI ``pusher`` SDK configured for ``server`` (plain HTTP, loopback)."""
    credentials = dict(app or DEFAULT_APP)
    options: dict[str, Any] = {
        "app_id": str(credentials["id"]),
        "key": str(credentials["key"]),
        "secret": str(credentials["secret"]),
        "host": "127.0.0.1",
        "port": server.port,
        "ssl": False,
        "timeout": scaled(10),
    }
    if master_key_b64 is not None:
        options["encryption_master_key_base64"] = master_key_b64
    options.update(overrides)
    return pusher.Pusher(**options)


@pytest.fixture
def py_pusher(bastion: BastionProcess, master_key_b64: str) -> pusher.Pusher:
    """The PyPI ``pusher`` SDK pointed at the default ``bastion`` server."""
    return make_py_pusher(bastion, master_key_b64=master_key_b64)
