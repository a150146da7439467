"""JWT verification (security/tokens.py): every check, each algorithm, JWKS, leeway.

Tokens are minted with PyJWT from keys generated once per module; ``now`` is a
fixed Unix time, never the system clock.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import strategies as st

from bastion.config import JwtSettings
from bastion.security.tokens import (
    CHECKS,
    GRANT_SEPARATORS,
    Claims,
    JwtVerifier,
    TokenError,
    grants,
    is_valid_grant,
    looks_like_jwt,
)

NOW = 1_800_000_000.0
SECRET = "s" * 40


def _pem(private: Any) -> str:
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key_2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def claims(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": NOW + 600, **extra}


def hs(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def check_of(verifier: JwtVerifier, token: str, now: float = NOW) -> str:
    with pytest.raises(TokenError) as info:
        verifier.verify(token, now)
    assert info.value.check in CHECKS
    assert token not in str(info.value)
    return info.value.check


@pytest.fixture
def hs_verifier() -> JwtVerifier:
    return JwtVerifier(["HS256"], secret=SECRET.encode())


# --- the shape ------------------------------------------------------------------------


def test_looks_like_jwt() -> None:
    assert looks_like_jwt(hs(claims()))
    assert looks_like_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0.")  # alg none: empty signature
    assert not looks_like_jwt("app-key:" + "ab" * 32)
    assert not looks_like_jwt("")
    assert not looks_like_jwt(None)
    assert not looks_like_jwt("a.b")
    assert not looks_like_jwt("a.b.c.d")


# --- HS256 -------------------------------------------------------------------------------


def test_hs256_valid_token_gives_claims(hs_verifier: JwtVerifier) -> None:
    token = hs(
        claims(
            channels=["private-a", "presence-room-*"],
            user_info={"name": "Alice"},
            socket_id="1.2",
            watchlist=["bob"],
        )
    )
    assert hs_verifier.verify(token, NOW) == Claims(
        sub="alice",
        exp=NOW + 600,
        channels=("private-a", "presence-room-*"),
        user_info={"name": "Alice"},
        socket_id="1.2",
        watchlist=("bob",),
    )


def test_optional_claims_default(hs_verifier: JwtVerifier) -> None:
    result = hs_verifier.verify(hs(claims()), NOW)
    assert (result.channels, result.user_info, result.socket_id, result.watchlist) == (
        (),
        None,
        None,
        (),
    )


def test_wrong_secret_is_a_signature_failure(hs_verifier: JwtVerifier) -> None:
    assert check_of(hs_verifier, hs(claims(), "t" * 40)) == "signature"


def test_tampered_payload_is_a_signature_failure(hs_verifier: JwtVerifier) -> None:
    header, _, signature = hs(claims()).split(".")
    forged = base64.urlsafe_b64encode(json.dumps(claims(sub="root")).encode()).rstrip(b"=")
    assert check_of(hs_verifier, f"{header}.{forged.decode()}.{signature}") == "signature"


def test_alg_none_is_refused(hs_verifier: JwtVerifier) -> None:
    token = jwt.encode(claims(), None, algorithm="none")
    assert check_of(hs_verifier, token) == "algorithm"


def test_algorithm_not_configured_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = JwtVerifier(["RS256"], public_key=_pem(rsa_key))
    assert check_of(verifier, hs(claims())) == "algorithm"


def test_hs512_is_refused(hs_verifier: JwtVerifier) -> None:
    token = jwt.encode(claims(), SECRET * 2, algorithm="HS512")
    assert check_of(hs_verifier, token) == "algorithm"


@pytest.mark.parametrize(
    "token",
    [
        "abc.def.ghi",
        "eyJhbGciOiJIUzI1NiJ9.!!!.x",
        "not a token",
        "a" * 9000 + ".b.c",
    ],
)
def test_malformed(hs_verifier: JwtVerifier, token: str) -> None:
    assert check_of(hs_verifier, token) == "malformed"


def test_non_object_payload_is_malformed(hs_verifier: JwtVerifier) -> None:
    token = jwt.api_jws.encode(b"[1,2]", SECRET, algorithm="HS256")
    assert check_of(hs_verifier, token) == "malformed"


@pytest.mark.parametrize(
    "payload",
    [
        claims(exp="soon"),
        claims(exp=True),
        claims(nbf="x"),
        claims(channels="private-a"),
        claims(channels=[1]),
        claims(socket_id=12),
        claims(watchlist="bob"),
    ],
)
def test_wrongly_typed_claims_are_malformed(
    hs_verifier: JwtVerifier, payload: dict[str, Any]
) -> None:
    assert check_of(hs_verifier, hs(payload)) == "malformed"


def test_exp_is_required(hs_verifier: JwtVerifier) -> None:
    assert check_of(hs_verifier, hs({"sub": "alice"})) == "missing_exp"


@pytest.mark.parametrize("sub", [None, "", 42])
def test_sub_is_required(hs_verifier: JwtVerifier, sub: Any) -> None:
    payload = claims()
    if sub is None:
        del payload["sub"]
    else:
        payload["sub"] = sub
    token = jwt.api_jws.encode(json.dumps(payload).encode(), SECRET, algorithm="HS256")
    assert check_of(hs_verifier, token) == "missing_sub"


@pytest.mark.parametrize(
    "sub_json",
    [
        '"\\ud800x"',  # a lone surrogate, as a JSON escape
        '"\\udc00"',
        '"nel\\u0085"',  # a C1 control
        '"a\\u0000b"',
        '"line\\nbreak"',
        '"' + "u" * 129 + '"',
    ],
)
def test_sub_must_be_a_valid_identity(hs_verifier: JwtVerifier, sub_json: str) -> None:
    # Built by hand so the payload carries exactly these JSON escapes.
    payload = '{"sub":' + sub_json + ',"exp":' + str(int(NOW + 600)) + "}"
    token = jwt.api_jws.encode(payload.encode(), SECRET, algorithm="HS256")
    assert check_of(hs_verifier, token) == "invalid_sub"


@pytest.mark.parametrize("sub", ["alice", "Zo\u00eb", "\U0001f600", "u" * 128, "a+b@example.com"])
def test_any_other_sub_is_accepted(hs_verifier: JwtVerifier, sub: str) -> None:
    assert hs_verifier.verify(hs(claims(sub=sub)), NOW).sub == sub


# --- time, with leeway -----------------------------------------------------------------


def test_exp_leeway_edges() -> None:
    verifier = JwtVerifier(["HS256"], secret=SECRET.encode(), leeway=30)
    token = hs(claims(exp=NOW))
    assert verifier.verify(token, NOW + 29.9).sub == "alice"
    assert check_of(verifier, token, NOW + 30) == "expired"
    assert check_of(verifier, token, NOW + 3600) == "expired"


def test_zero_leeway() -> None:
    verifier = JwtVerifier(["HS256"], secret=SECRET.encode(), leeway=0)
    token = hs(claims(exp=NOW))
    assert verifier.verify(token, NOW - 0.001).sub == "alice"
    assert check_of(verifier, token, NOW) == "expired"


@pytest.mark.parametrize("claim", ["nbf", "iat"])
def test_not_yet_valid_with_leeway(claim: str) -> None:
    verifier = JwtVerifier(["HS256"], secret=SECRET.encode(), leeway=30)
    token = hs(claims(**{claim: NOW + 30}))
    assert verifier.verify(token, NOW).sub == "alice"  # exactly at the leeway edge
    assert check_of(verifier, hs(claims(**{claim: NOW + 30.5}))) == "not_yet_valid"


def test_verify_uses_the_given_now_not_the_system_clock() -> None:
    verifier = JwtVerifier(["HS256"], secret=SECRET.encode(), leeway=0)
    old = hs({"sub": "alice", "exp": 1_000})  # expired decades ago by the system clock
    assert verifier.verify(old, 999).exp == 1_000


# --- audience and issuer ---------------------------------------------------------------


def test_audience() -> None:
    verifier = JwtVerifier(["HS256"], secret=SECRET.encode(), audience="bastion")
    assert verifier.verify(hs(claims(aud="bastion")), NOW).sub == "alice"
    assert verifier.verify(hs(claims(aud=["other", "bastion"])), NOW).sub == "alice"
    assert check_of(verifier, hs(claims(aud="other"))) == "audience"
    assert check_of(verifier, hs(claims())) == "audience"
    assert check_of(verifier, hs(claims(aud=7))) == "audience"


def test_issuer() -> None:
    verifier = JwtVerifier(["HS256"], secret=SECRET.encode(), issuer="https://id.example")
    assert verifier.verify(hs(claims(iss="https://id.example")), NOW).sub == "alice"
    assert check_of(verifier, hs(claims(iss="https://evil.example"))) == "issuer"
    assert check_of(verifier, hs(claims())) == "issuer"


def test_unconfigured_audience_is_not_checked(hs_verifier: JwtVerifier) -> None:
    assert hs_verifier.verify(hs(claims(aud="anything")), NOW).sub == "alice"


# --- RS256 / ES256 ----------------------------------------------------------------------


def test_rs256_with_a_pem(rsa_key: rsa.RSAPrivateKey, rsa_key_2: rsa.RSAPrivateKey) -> None:
    verifier = JwtVerifier(["RS256"], public_key=_pem(rsa_key))
    assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256"), NOW).sub == "alice"
    other = jwt.encode(claims(), rsa_key_2, algorithm="RS256")
    assert check_of(verifier, other) == "signature"


def test_es256_with_a_pem(ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = JwtVerifier(["ES256"], public_key=_pem(ec_key))
    assert verifier.verify(jwt.encode(claims(), ec_key, algorithm="ES256"), NOW).sub == "alice"


def test_es256_token_against_an_rsa_pem_finds_no_key(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    verifier = JwtVerifier(["RS256", "ES256"], public_key=_pem(rsa_key))
    assert check_of(verifier, jwt.encode(claims(), ec_key, algorithm="ES256")) == "unknown_kid"


def test_algorithm_confusion_public_key_as_hmac_secret(rsa_key: rsa.RSAPrivateKey) -> None:
    """An HS256 token "signed" with the RSA public key PEM never verifies."""
    pem = _pem(rsa_key)
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    signing_input = header + b"." + body
    mac = hmac.new(pem.encode(), signing_input, hashlib.sha256).digest()
    token = (signing_input + b"." + base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()
    # RS256 only: HS256 is not accepted at all.
    assert check_of(JwtVerifier(["RS256"], public_key=_pem(rsa_key)), token) == "algorithm"
    # Both accepted: HS256 is checked with the HS secret only, never with the PEM.
    both = JwtVerifier(["HS256", "RS256"], secret=SECRET.encode(), public_key=pem)
    assert check_of(both, token) == "signature"


def test_a_private_key_pem_is_refused_at_construction(rsa_key: rsa.RSAPrivateKey) -> None:
    private = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    with pytest.raises(ValueError):
        JwtVerifier(["RS256"], public_key=private)


def test_a_pem_of_the_wrong_type_is_refused_at_construction(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        JwtVerifier(["RS256"], public_key=_pem(ec_key))


# --- JWKS --------------------------------------------------------------------------------


def _jwk(private: Any, kid: str) -> dict[str, Any]:
    algorithm = jwt.algorithms.RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) else None
    if algorithm is not None:
        jwk = json.loads(algorithm.to_jwk(private.public_key()))
    else:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwk["kid"] = kid
    return dict(jwk)


def test_jwks_picks_the_key_by_kid(
    rsa_key: rsa.RSAPrivateKey,
    rsa_key_2: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    jwks = json.dumps(
        {
            "keys": [
                _jwk(rsa_key, "one"),
                _jwk(rsa_key_2, "two"),
                _jwk(ec_key, "ec"),
                {"kty": "oct", "kid": "shared", "k": "c2VjcmV0"},
            ]
        }
    )
    verifier = JwtVerifier(["RS256", "ES256"], jwks=jwks)
    first = jwt.encode(claims(sub="a"), rsa_key, algorithm="RS256", headers={"kid": "one"})
    second = jwt.encode(claims(sub="b"), rsa_key_2, algorithm="RS256", headers={"kid": "two"})
    third = jwt.encode(claims(sub="c"), ec_key, algorithm="ES256", headers={"kid": "ec"})
    assert [verifier.verify(t, NOW).sub for t in (first, second, third)] == ["a", "b", "c"]
    # Right key set, wrong kid for the signer: the signature does not verify.
    swapped = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "two"})
    assert check_of(verifier, swapped) == "signature"
    unknown = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "three"})
    assert check_of(verifier, unknown) == "unknown_kid"
    no_kid = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert check_of(verifier, no_kid) == "unknown_kid"
    # An ES256 token naming an RSA kid: never verified with a key of the other type.
    crossed = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "one"})
    assert check_of(verifier, crossed) == "unknown_kid"


def test_jwks_symmetric_keys_are_ignored() -> None:
    jwks = json.dumps({"keys": [{"kty": "oct", "kid": "shared", "k": "c2VjcmV0"}]})
    with pytest.raises(ValueError, match="need a public key"):
        JwtVerifier(["RS256"], jwks=jwks)


@pytest.mark.parametrize("text", ["not json", "[]", '{"keys": 3}', '{"nokeys": []}'])
def test_bad_jwks_document(text: str) -> None:
    with pytest.raises(ValueError):
        JwtVerifier(["RS256"], jwks=text)


# --- from settings ------------------------------------------------------------------------


def test_from_settings_reads_files_through_the_given_reader(rsa_key: rsa.RSAPrivateKey) -> None:
    settings = JwtSettings(
        algorithms=["HS256", "RS256"],
        secret=SECRET,
        public_key_file="/keys/rs.pem",
        audience="bastion",
        issuer="issuer",
        leeway_seconds=5,
    )
    files = {"/keys/rs.pem": _pem(rsa_key)}
    read: list[str] = []

    def reader(path: str) -> str:
        read.append(path)
        return files[path]

    verifier = JwtVerifier.from_settings(settings, reader)
    assert read == ["/keys/rs.pem"]
    assert (verifier.audience, verifier.issuer, verifier.leeway) == ("bastion", "issuer", 5)
    token = jwt.encode(claims(aud="bastion", iss="issuer"), rsa_key, algorithm="RS256")
    assert verifier.verify(token, NOW).sub == "alice"
    assert verifier.verify(hs(claims(aud="bastion", iss="issuer")), NOW).sub == "alice"


# --- grants --------------------------------------------------------------------------------


def test_grants_exact_and_prefix() -> None:
    patterns = ("private-a", "presence-room-*")
    assert grants(patterns, "private-a")
    assert not grants(patterns, "private-ab")
    assert grants(patterns, "presence-room-1")
    assert grants(patterns, "presence-room-")
    assert not grants(patterns, "presence-roo")
    assert not grants((), "private-a")
    assert not grants(("private-*-x",), "private-a-x")  # "*" only counts at the end


#: (pattern, channel, granted), byte for byte.
GRANT_TABLE = [
    # Issue #11: a wildcard after a partial segment used to reach into other users.
    ("private-user-1*", "private-user-1", False),
    ("private-user-1*", "private-user-12", False),
    ("private-user-1*", "private-user-1-x", False),
    ("private-user-1-*", "private-user-1-x", True),
    ("private-user-1-*", "private-user-1-", True),
    ("private-user-1-*", "private-user-1-x-y", True),
    ("private-user-1-*", "private-user-12-x", False),
    ("private-user-1-*", "private-user-1", False),
    # every separator of the channel-name set ends a segment
    ("private-team_*", "private-team_red", True),
    ("private-k=*", "private-k=v", True),
    ("private-user@*", "private-user@example.com", True),
    ("private-a,*", "private-a,b", True),
    ("private-v1.*", "private-v1.2", True),
    ("private-v1.*", "private-v12", False),
    ("private-a;*", "private-a;b", True),
    # the bare wildcard and a whole kind
    ("*", "private-anything", True),
    ("*", "presence-room-1", True),
    ("private-*", "private-a", True),
    ("private-*", "presence-a", False),
    ("presence-*", "presence-a", True),
    # no separator before the "*": grants nothing at all
    ("p*", "private-a", False),
    ("private*", "private-a", False),
    ("Private-*", "private-a", False),
    ("private-user-1**", "private-user-1*x", False),
    # exact names stay exact
    ("private-user-1", "private-user-1", True),
    ("private-user-1", "private-user-12", False),
    ("private-user-1", "private-user-1-x", False),
]


@pytest.mark.parametrize(("pattern", "channel", "granted"), GRANT_TABLE)
def test_grants_byte_exact(pattern: str, channel: str, granted: bool) -> None:
    assert grants((pattern,), channel) is granted


@pytest.mark.parametrize(
    ("pattern", "valid"),
    [
        ("private-user-1", True),
        ("private-user-1-*", True),
        ("*", True),
        ("private-*", True),
        ("private-a_*", True),
        ("private-a.*", True),
        ("private-*-x", True),  # literal "*": never matches, but harmless
        ("private-user-1*", False),
        ("p*", False),
        ("**", False),
        ("private-a**", False),
        ("private-é*", False),
    ],
)
def test_is_valid_grant(pattern: str, valid: bool) -> None:
    assert is_valid_grant(pattern) is valid


@pytest.mark.parametrize("bad", ["private-user-1*", "*x*", "presence-room*"])
def test_a_token_granting_a_partial_segment_is_refused(hs_verifier: JwtVerifier, bad: str) -> None:
    token = hs(claims(channels=["private-ok", bad]))
    assert check_of(hs_verifier, token) == "channels"
    good = hs(claims(channels=["private-ok", "private-user-1-*", "*"]))
    assert hs_verifier.verify(good, NOW).channels == ("private-ok", "private-user-1-*", "*")


_NAMES = st.text(alphabet="abc-_*", max_size=12)


@given(prefix=_NAMES, name=_NAMES)
def test_a_prefix_pattern_grants_exactly_the_names_under_a_whole_segment(
    prefix: str, name: str
) -> None:
    pattern = prefix + "*"
    at_boundary = prefix == "" or prefix[-1] in GRANT_SEPARATORS
    assert grants((pattern,), name) == (at_boundary and name.startswith(prefix))
    assert is_valid_grant(pattern) == at_boundary


_SEGMENT = st.text(alphabet="abcxyz019", min_size=1, max_size=6)
_TAIL = st.text(alphabet="abc19-_.@", max_size=8)


@given(mine=_SEGMENT, other=_SEGMENT, tail=_TAIL, sep=st.sampled_from(sorted(GRANT_SEPARATORS)))
def test_a_grant_never_reaches_into_another_segment(
    mine: str, other: str, tail: str, sep: str
) -> None:
    """Whatever the ids, ``private-user-{mine}{sep}*`` never grants another user's channels."""
    pattern = f"private-user-{mine}{sep}*"
    assert grants((pattern,), f"private-user-{mine}{sep}{tail}")
    if other != mine:
        assert not grants((pattern,), f"private-user-{other}{sep}{tail}")
        assert not grants((pattern,), f"private-user-{other}")
    assert not grants((f"private-user-{mine}*",), f"private-user-{mine}{other}{tail}")


@given(pattern=_NAMES.filter(lambda p: not p.endswith("*")), name=_NAMES)
def test_an_exact_pattern_grants_only_itself(pattern: str, name: str) -> None:
    assert grants((pattern,), name) == (pattern == name)
