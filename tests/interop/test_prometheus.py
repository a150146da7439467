"""A real Prometheus (Debian's package) scrapes a real ``bastion serve`` with the token.

The node accepts scrapes with ``[metrics] token`` only (``allow_from`` is empty), so
the scrape proves the bearer-token path. Prometheus runs in its own temporary
directory on a port picked free on 127.0.0.1 (it cannot bind port 0 itself), loads
``deploy/prometheus/bastion-rules.yml``, and its HTTP API is polled, bounded, until
a query about the node answers, and so does a recording rule of the shipped file.

``.ci/run`` installs the package, so CI never skips this test; elsewhere it skips,
naming the package, only when the ``prometheus`` binary is absent.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.redis_server import free_port
from support.server import REPO_ROOT, BastionProcess
from support.timeouts import scaled, until

RULES = REPO_ROOT / "deploy" / "prometheus" / "bastion-rules.yml"
TOKEN = "prometheus-scrape-token-0123456789abcdef"


@pytest.fixture
def prometheus_bin() -> str:
    found = shutil.which("prometheus")
    if found is None:
        pytest.skip(
            "the prometheus binary is not installed (`apt-get install -y prometheus`;"
            " .ci/run installs it, so CI runs this test)"
        )
    return found


class Prometheus:
    """A Prometheus process of our own, stopped by its PID."""

    def __init__(self, binary: str, directory: Path, target_port: int) -> None:
        self.port = free_port()
        token_file = directory / "token"
        token_file.write_text(TOKEN, encoding="utf-8")
        token_file.chmod(0o600)
        config = directory / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML: no quoting surprises
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {
                            "job_name": "bastion",
                            "scrape_interval": "1s",
                            "authorization": {
                                "type": "Bearer",
                                "credentials_file": str(token_file),
                            },
                            "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                        }
                    ],
                }
            ),
            encoding="utf-8",
        )
        self.log = (directory / "prometheus.log").open("w+b")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query ([] while nothing answers)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        try:
            with urllib.request.urlopen(url, timeout=scaled(5)) as answer:
                body = json.load(answer)
        except OSError:
            return []  # not listening yet
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(scaled(10))
        self.log.close()


@pytest.fixture
def run_prometheus(prometheus_bin: str, tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    started: list[Prometheus] = []

    def start(target_port: int) -> Prometheus:
        directory = tmp_path / f"prometheus{len(started)}"
        directory.mkdir()
        started.append(Prometheus(prometheus_bin, directory, target_port))
        return started[-1]

    yield start
    for prometheus in started:
        output = prometheus.output()
        prometheus.stop()
        print(output[-4000:])


async def test_a_real_prometheus_scrapes_a_real_node_with_the_bearer_token(
    make_bastion: Callable[..., BastionProcess],
    run_prometheus: Callable[[int], Prometheus],
) -> None:
    server = make_bastion(metrics={"token": TOKEN, "allow_from": []})
    prometheus = run_prometheus(server.port)

    def value(promql: str) -> float | None:
        result = prometheus.query(promql)
        return float(result[0]["value"][1]) if result else None

    await until(
        lambda: value('up{job="bastion"}') == 1.0,
        60,
        message=lambda: f"Prometheus never scraped the node:\n{prometheus.output()[-2000:]}",
    )
    await until(lambda: value('bastion_ready{job="bastion"}') == 1.0, 30)
    assert value('sum(bastion_connections_current{job="bastion"})') == 0.0
    # The shipped rules are loaded and evaluated against the node's series.
    await until(lambda: prometheus.query("bastion:connections_current:sum") != [], 30)
    assert prometheus.query('ALERTS{alertname="BastionDown"}') == []
    assert TOKEN not in server.output
