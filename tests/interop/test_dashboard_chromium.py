"""The operator dashboard in a real browser: Debian Chromium, headless, on loopback.

``js/dashboard.js`` drives ``/dashboard`` of a real ``bastion serve`` process with
``playwright-core``: a wrong token is refused, the right one logs in, a pusher-js
connection appears in the per-app table, an address blocked through the form is
listed and appears in the audit tail, its Unblock button lifts it, the security
alert the wrong token raised is listed as open, and the log-out
forgets the token. No Content-Security-Policy violation or script error may occur.

Chromium is required (CI installs it, see ``.ci/run``): without ``/usr/bin/chromium``
the test fails rather than skipping. ``BASTION_DASHBOARD_SCREENSHOT=PATH`` also saves
a 1280x800 PNG of the page with some traffic, blocks and refusals (how
``docs/dashboard.png`` is made).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.server import DEFAULT_APP, BastionProcess, app_spec
from support.timeouts import scaled

from .node_driver import INTEROP_DIR

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT = INTEROP_DIR / "js" / "dashboard.js"
TOKEN = "dashboard-chromium-admin-token-0123456789"
BLOCKED = "203.0.113.7"
OTHER_APP = app_spec(id="67890", key="other-key", secret="other-secret")


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the dashboard test needs Debian's Chromium"
            " (`apt-get install -y chromium`; .ci/run installs it)"
        )
    return CHROMIUM


@pytest.fixture
def playwright(node_modules: Path) -> Path:
    package = node_modules / "playwright-core" / "package.json"
    if not package.is_file():
        pytest.fail(
            "tests/interop/node_modules has no playwright-core:"
            " run `npm ci --prefix tests/interop` (the lock file pins it)"
        )
    return package.parent


def admin_get(server: BastionProcess, route: str) -> Any:
    request = urllib.request.Request(
        f"{server.http_url}/api/security/{route}",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=scaled(10)) as response:
        return json.load(response)


def test_dashboard_in_chromium(
    make_bastion: Callable[..., BastionProcess],
    tmp_path: Path,
    node_bin: str,
    chromium: Path,
    playwright: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    server = make_bastion(
        apps=[DEFAULT_APP, OTHER_APP],
        admin={"token": TOKEN},
        audit={"path": str(state / "audit.sqlite3")},
        security={"reputation": {"store_path": str(state / "blocks.sqlite3")}},
        # The wrong-token step is one failed authentication: it raises an alert.
        alerts={"auth_failures": {"threshold": 1}},
    )
    screenshot = os.environ.get("BASTION_DASHBOARD_SCREENSHOT") or None
    config = {
        "base": server.http_url,
        "port": server.port,
        "token": TOKEN,
        "apps": [
            {"id": app["id"], "key": app["key"], "secret": app["secret"]}
            for app in (DEFAULT_APP, OTHER_APP)
        ],
        "chromium": str(chromium),
        "timeoutMs": int(scaled(15) * 1000),
        "screenshot": str(Path(screenshot).resolve()) if screenshot else None,
        "blockIp": BLOCKED,
    }
    try:
        run = subprocess.run(
            [node_bin, str(SCRIPT)],
            cwd=str(INTEROP_DIR),
            input=json.dumps(config),
            capture_output=True,
            text=True,
            timeout=scaled(180 if screenshot else 90),
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the browser script did not finish in time:\n{expired.stdout!r}")
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result from the browser script ({run.returncode}):\n{run.stderr[-4000:]}"
    result = json.loads(lines[-1])
    assert result["ok"] is True, json.dumps(result, indent=2) + "\n" + run.stderr[-4000:]
    assert run.returncode == 0
    assert "log out" in result["steps"]
    assert TOKEN not in run.stdout + run.stderr

    # What the browser did is what the node recorded.
    assert not any(block["ip"] == BLOCKED for block in admin_get(server, "dashboard")["blocks"])
    blocked = admin_get(server, f"audit-logs?type=ip_blocked_manual&ip={BLOCKED}")["events"]
    unblocked = admin_get(server, f"audit-logs?type=ip_unblocked&ip={BLOCKED}")["events"]
    assert len(blocked) == 1 and len(unblocked) == 1
    refused = admin_get(server, "audit-logs?type=admin_unauthorized")["events"]
    assert len(refused) >= 1  # the wrong token
    if screenshot:
        assert Path(screenshot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
