"""``[server.tls]``: the settings, the server context, its start-up errors, the doctor.

Certificates are made at test time with ``cryptography`` (self-signed, 127.0.0.1).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bastion.config import Settings, TlsSettings, settings_from_mapping
from bastion.errors import BastionError, ConfigError
from bastion.security.doctor import examine
from bastion.server.tls import TlsError, server_context

GOOD_SECRET = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _self_signed(tmp_path: Path) -> tuple[Path, Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = tmp_path / "cert.pem"
    key_path = tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_key_pem(key))
    return cert_path, key_path, key


def _tls(cert: Path, key: Path, **extra: str) -> TlsSettings:
    return TlsSettings.model_validate({"cert": str(cert), "key": str(key), **extra})


# --- settings ----------------------------------------------------------------------------


def test_tls_is_off_by_default_and_loads_from_server_tls() -> None:
    assert Settings().server.tls is None
    settings = settings_from_mapping(
        {"server": {"tls": {"cert": "/etc/bastion/cert.pem", "key": "/etc/bastion/key.pem"}}},
        environ={},
    )
    assert settings.server.tls == TlsSettings(
        cert="/etc/bastion/cert.pem", key="/etc/bastion/key.pem", min_version="TLSv1.2"
    )


def test_tls_settings_reject_empty_paths_unknown_versions_and_fields() -> None:
    cases = [
        ({"cert": "", "key": "k.pem"}, "server.tls.cert"),
        ({"cert": "c.pem", "key": "  "}, "server.tls.key"),
        ({"cert": "c.pem"}, "server.tls.key"),
        ({"cert": "c.pem", "key": "k.pem", "min_version": "TLSv1.1"}, "server.tls.min_version"),
        ({"cert": "c.pem", "key": "k.pem", "ciphers": "ALL"}, "server.tls.ciphers"),
    ]
    for table, field in cases:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            settings_from_mapping({"server": {"tls": table}}, environ={})


def test_tls_files_are_not_read_when_settings_load(tmp_path: Path) -> None:
    # Existence is checked when the node starts (TlsError, exit 1), not at load.
    settings = settings_from_mapping(
        {"server": {"tls": {"cert": str(tmp_path / "no.pem"), "key": str(tmp_path / "no.key")}}},
        environ={},
    )
    assert settings.server.tls is not None


def test_tls_settings_from_environment() -> None:
    settings = settings_from_mapping(
        {},
        environ={
            "BASTION_SERVER__TLS__CERT": "/run/cert.pem",
            "BASTION_SERVER__TLS__KEY": "/run/key.pem",
            "BASTION_SERVER__TLS__MIN_VERSION": "TLSv1.3",
        },
    )
    assert settings.server.tls == TlsSettings(
        cert="/run/cert.pem", key="/run/key.pem", min_version="TLSv1.3"
    )


# --- the context ---------------------------------------------------------------------------


def test_server_context_is_a_hardened_server_context(tmp_path: Path) -> None:
    cert, key, _ = _self_signed(tmp_path)
    context = server_context(_tls(cert, key))
    assert isinstance(context, ssl.SSLContext)
    assert context.protocol is ssl.PROTOCOL_TLS_SERVER
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.verify_mode is ssl.CERT_NONE  # no client certificates asked for
    assert server_context(_tls(cert, key, min_version="TLSv1.3")).minimum_version is (
        ssl.TLSVersion.TLSv1_3
    )


def test_tls_error_is_a_bastion_error_not_a_config_error() -> None:
    assert issubclass(TlsError, BastionError)
    assert not issubclass(TlsError, ConfigError)


def test_missing_files_are_named(tmp_path: Path) -> None:
    cert, key, _ = _self_signed(tmp_path)
    missing = tmp_path / "missing.pem"
    with pytest.raises(TlsError, match=r"certificate file .*missing\.pem.*No such file"):
        server_context(_tls(missing, key))
    with pytest.raises(TlsError, match=r"key file .*missing\.pem.*No such file"):
        server_context(_tls(cert, missing))
    with pytest.raises(TlsError, match=r"certificate file .*tmp"):
        server_context(_tls(tmp_path, key))  # a directory


def test_swapped_or_wrong_files_are_named_without_their_content(tmp_path: Path) -> None:
    cert, key, _ = _self_signed(tmp_path)
    key_text = key.read_text()
    with pytest.raises(TlsError) as swapped:
        server_context(_tls(key, cert))
    assert str(key) in str(swapped.value)
    assert "no PEM certificate" in str(swapped.value)
    assert "BEGIN" not in str(swapped.value)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text(
        "-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n"
    )
    with pytest.raises(TlsError) as broken:
        server_context(_tls(cert, garbage))
    message = str(broken.value)
    assert str(garbage) in message
    assert "not base64" not in message
    assert key_text not in message


def test_a_key_that_does_not_match_the_certificate_is_named(tmp_path: Path) -> None:
    cert, _, _ = _self_signed(tmp_path)
    other = tmp_path / "other.key"
    other.write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(TlsError, match=r"key file .*other\.key.* does not match the certificate"):
        server_context(_tls(cert, other))


def test_an_encrypted_key_is_refused_without_prompting(tmp_path: Path) -> None:
    cert, key_path, key = _self_signed(tmp_path)
    key_path.write_bytes(_key_pem(key, password=b"correct horse battery staple"))
    with pytest.raises(TlsError, match="is encrypted"):
        server_context(_tls(cert, key_path))


# --- bastion doctor ------------------------------------------------------------------------


def _doctor_settings(server: dict[str, object]) -> Settings:
    return settings_from_mapping(
        {
            "server": server,
            "apps": [
                {
                    "id": "1",
                    "key": "k",
                    "secret": GOOD_SECRET,
                    "allowed_origins": ["https://app.example.com"],
                    "rest_requests": {"rate": 100, "burst": 200},
                }
            ],
        },
        environ={},
    )


def _transport(settings: Settings) -> tuple[str, str]:
    (finding,) = [f for f in examine(settings) if f.check == "transport"]
    return finding.level, finding.message


def test_doctor_passes_transport_when_a_public_host_serves_tls() -> None:
    tls = {"cert": "/etc/bastion/cert.pem", "key": "/etc/bastion/key.pem"}
    level, message = _transport(_doctor_settings({"host": "0.0.0.0", "tls": tls}))
    assert level == "pass"
    assert "TLSv1.2" in message
    level, message = _transport(_doctor_settings({"host": "0.0.0.0"}))
    assert level == "warn"
    assert "[server.tls]" in message
