"""Fixtures shared by every test directory: a real Bastion server process.

* ``bastion`` — a fresh server (function scope: every test gets its own process and
  its own OS-chosen port) started from :data:`support.server.DEFAULT_CONFIG_TOML`.
* ``make_bastion`` — a factory: ``make_bastion(toml_text)`` (or ``make_bastion()``
  for the default config, or ``make_bastion(apps=[...], server={...})`` to build the
  TOML with :func:`support.server.config_toml`). Every server it started is stopped
  at teardown.

The server's captured stdout/stderr are printed at teardown, so pytest shows them for
a failing test (and they stay on ``server.stdout_text`` / ``server.stderr_text`` /
``server.output`` for assertions).

Time-outs everywhere are multiplied by ``BASTION_TEST_TIMEOUT_SCALE`` (see
``support/timeouts.py``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# Hypothesis: CI machines are shared and slow at times, so their examples have no
# per-example deadline (a slow example is not a failing one); locally the default
# deadline stays and flags accidental slowness. BASTION_HYPOTHESIS_PROFILE overrides.
settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile(
    os.environ.get("BASTION_HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:  # `from support...` works however pytest was started
    sys.path.insert(0, str(_TESTS_DIR))

from support import hygiene  # noqa: E402
from support.server import (  # noqa: E402
    DEFAULT_APP,
    DEFAULT_CONFIG_TOML,
    BastionProcess,
    config_toml,
    run_bastion,
)

MakeBastion = Callable[..., BastionProcess]


def _report(servers: list[BastionProcess]) -> None:
    for server in servers:
        print(f"\n===== {server!r} config {server.config_path} =====")
        print("--- stdout ---")
        print(server.stdout_text[-20000:])
        print("--- stderr ---")
        print(server.stderr_text[-20000:])


@pytest.fixture
def make_bastion(tmp_path: Path) -> Iterator[MakeBastion]:
    """Factory fixture: start a Bastion with the given TOML; all stopped at teardown.

    Call as ``make_bastion(toml_text, env=..., startup_timeout=...)`` or with
    ``config_toml`` keyword arguments (``apps=``, ``server=``, other sections).
    """
    started: list[BastionProcess] = []

    def factory(
        config_toml_text: str | None = None,
        *,
        env: dict[str, str] | None = None,
        startup_timeout: float | None = None,
        extra_args: tuple[str, ...] = (),
        **config_kwargs: Any,
    ) -> BastionProcess:
        if config_toml_text is not None and config_kwargs:
            raise TypeError("pass either TOML text or config_toml() keyword arguments, not both")
        text = (
            config_toml_text
            if config_toml_text is not None
            else (config_toml(**config_kwargs) if config_kwargs else DEFAULT_CONFIG_TOML)
        )
        server = run_bastion(
            text, tmp_path, env=env, extra_args=extra_args, startup_timeout=startup_timeout
        )
        started.append(server)
        return server

    try:
        yield factory
    finally:
        errors = []
        for server in started:
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        _report(started)
        if errors:
            raise errors[0]


@pytest.fixture
def bastion(make_bastion: MakeBastion) -> BastionProcess:
    """A running Bastion with the default config (app id 12345, key app-key)."""
    return make_bastion(DEFAULT_CONFIG_TOML)


@pytest.fixture
def default_app() -> dict[str, Any]:
    """The credentials and flags of the app in the default config."""
    return dict(DEFAULT_APP)


# --- the session-wide secrets grep (support/hygiene.py, tests/test_hygiene.py) -------------


#: Tests that judge what every other test left behind: they run last.
_RUN_LAST = ("test_hygiene.py", "test_working_directory.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the hygiene checks last: they look at what every other test left behind."""
    last = [item for item in items if item.path.name in _RUN_LAST]
    items[:] = [item for item in items if item.path.name not in _RUN_LAST] + last


#: Files found in the working directory when the session started (see
#: tests/test_working_directory.py: no test may leave state files there).
STARTING_FILES: frozenset[str] = frozenset(
    entry.name for entry in Path.cwd().iterdir() if entry.is_file()
)


@pytest.fixture(scope="session", autouse=True)
def _hygiene_taps() -> Iterator[hygiene.LogTap]:
    """Tap every bastion log record and every in-process node's secrets."""
    from bastion.server import runtime

    tap = hygiene.LogTap()
    logger = logging.getLogger("bastion")
    previous_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)  # what `bastion serve` logs by default
    logger.addHandler(tap)
    original_init = runtime.Node.__init__

    def init(self: runtime.Node, settings: Any, *args: Any, **kwargs: Any) -> None:
        hygiene.remember_settings(settings)
        original_init(self, settings, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime.Node, "__init__", init)
        yield tap
    logger.removeHandler(tap)
    logger.setLevel(previous_level)
