"""bastion doctor on the shipped example: its placeholders fail, strong secrets pass."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from bastion.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "bastion.example.toml"
STRONG = {
    "BASTION_APPS__0__SECRET": "5d41402abc4b2a76b9719d911017c592ae2f8c1e9a0b7d3c6f4e1a2b3c4d5e6f",
    "BASTION_APPS__1__SECRET": "7c6a180b36896a0a8c02787eeafb0e4c1f9e8d7c6b5a49382716f5e4d3c2b1a0",
    "BASTION_APPS__1__JWT__SECRET": (
        "e4da3b7fbbce2345d7772b0674a318d5c1b2a3f4e5d6c7b8a9f0e1d2c3b4a596"
    ),
    "BASTION_ALERTS__SECRET": "1679091c5a880faf6fb5e6087eb1b2dc4daa3db355ef2b0e64b472968cb70f0d",
}


def test_the_example_fails_on_its_placeholders_without_printing_them() -> None:
    result = CliRunner().invoke(main, ["doctor", "--config", str(EXAMPLE)], env={})
    assert result.exit_code == 1, result.output
    failures = [line for line in result.output.splitlines() if line.startswith("FAIL")]
    assert [line.split(":")[0] for line in failures] == [
        "FAIL  alerts.secret",
        "FAIL  apps.12345.secret",
        "FAIL  apps.67890.secret",
        "FAIL  apps.67890.jwt.secret",
    ]
    assert "replace-me" not in result.output
    assert result.output.rstrip().endswith("4 failed")


def test_strong_secrets_from_the_environment_pass() -> None:
    result = CliRunner().invoke(main, ["doctor", "--config", str(EXAMPLE)], env=STRONG)
    assert result.exit_code == 0, result.output
    assert "FAIL" not in result.output
    for secret in STRONG.values():
        assert secret not in result.output


def test_an_invalid_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 'x'\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["doctor", "--config", str(bad)], env={})
    assert result.exit_code == 2 and "server.port" in result.output


def test_hardening_round_2_findings_through_the_cli(tmp_path: Path) -> None:
    config = tmp_path / "open.toml"
    config.write_text(
        "[server]\n"
        'host = "0.0.0.0"\n'
        "[security]\n"
        'trusted_proxies = ["0.0.0.0/0"]\n'
        "[security.reputation]\n"
        'never_block = ["::/0"]\n'
        "[admin]\n"
        'allow_from = ["10.0.0.0/8"]\n'
        "[[apps]]\n"
        'id = "1"\n'
        'key = "k"\n'
        'allowed_origins = ["https://app.example.com"]\n'
        "[apps.jwt]\n"
        'algorithms = ["HS256"]\n'
        "allow_query_token = true\n",
        encoding="utf-8",
    )
    env = {
        "BASTION_APPS__0__SECRET": STRONG["BASTION_APPS__0__SECRET"],
        "BASTION_APPS__0__JWT__SECRET": STRONG["BASTION_APPS__1__JWT__SECRET"],
        "BASTION_ADMIN__TOKEN": "a" * 32,
        "BASTION_METRICS__TOKEN": "metrics-token-0123456789abcdefghijklmn",
    }
    result = CliRunner().invoke(main, ["doctor", "--config", str(config)], env=env)
    assert result.exit_code == 1, result.output
    lines = {line.split(":")[0]: line for line in result.output.splitlines()}
    for check in (
        "security.trusted_proxies",
        "security.never_block",
        "admin",
        "admin.token",
        "metrics",
        "metrics.token",
    ):
        assert f"FAIL  {check}" in lines, (check, result.output)
    for check in ("admin.proxy", "apps.1.jwt.allow_query_token"):
        assert f"WARN  {check}" in lines, (check, result.output)
    assert "TLS only" not in result.output
    for secret in env.values():
        assert secret not in result.output
