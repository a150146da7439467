"""``bastion apps new`` and ``bastion secrets generate`` as an operator runs them."""

from __future__ import annotations

import re
import stat
from pathlib import Path

from support.server import run_bastion_cli

from bastion.config import load_settings


def test_apps_new_prints_credentials_and_a_table_that_loads(tmp_path: Path) -> None:
    result = run_bastion_cli(["apps", "new"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    app_id = re.search(r"app id:\s+(\d{7})", result.stdout)
    secret = re.search(r"secret:\s+([0-9a-f]{64})", result.stdout)
    assert app_id and secret
    table = result.stdout[result.stdout.index("[[apps]]") :]
    config = tmp_path / "bastion.toml"
    config.write_text(table, encoding="utf-8")
    (app,) = load_settings(config).apps
    assert app.id == app_id[1] and app.secret.get_secret_value() == secret[1]


def test_apps_new_appends_to_a_file_only_when_it_still_loads(tmp_path: Path) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text('[server]\nport = 7000\n\n[[apps]]\nid = "1"\nkey = "k"\nsecret = "s"\n')
    config.chmod(0o640)
    added = run_bastion_cli(["apps", "new", "--id", "777", "--append", str(config)], cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    settings = load_settings(config)
    assert [app.id for app in settings.apps] == ["1", "777"]
    assert settings.server.port == 7000
    new_secret = settings.apps[1].secret.get_secret_value()
    assert new_secret not in added.stdout  # the secret goes to the file, not the terminal
    assert stat.S_IMODE(config.stat().st_mode) == 0o640  # the file keeps its mode
    before = config.read_text()
    again = run_bastion_cli(["apps", "new", "--id", "777", "--append", str(config)], cwd=tmp_path)
    assert again.returncode == 2 and "777" in again.stderr  # a duplicate id: refused
    assert config.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bastion.toml"]


def test_apps_new_refuses_a_bad_id(tmp_path: Path) -> None:
    result = run_bastion_cli(["apps", "new", "--id", "no spaces"], cwd=tmp_path)
    assert result.returncode == 2 and "--id" in result.stderr and result.stdout == ""


def test_secrets_generate_prints_a_strong_secret(tmp_path: Path) -> None:
    first = run_bastion_cli(["secrets", "generate"], cwd=tmp_path)
    second = run_bastion_cli(["secrets", "generate", "--bytes", "48"], cwd=tmp_path)
    assert re.fullmatch(r"[0-9a-f]{64}\n", first.stdout)
    assert re.fullmatch(r"[0-9a-f]{96}\n", second.stdout)
    weak = run_bastion_cli(["secrets", "generate", "--bytes", "8"], cwd=tmp_path)
    assert weak.returncode == 2
