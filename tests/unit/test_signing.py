"""HMAC signatures, byte-exact against the spec's vectors and the official PyPI SDK.

Vectors: spec §8.4 (with the §8.5 erratum), §15.2 (REST), §16.1 (webhook).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import pusher
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.protocol.refusals import Reason
from bastion.protocol.signing import (
    REST_TIMESTAMP_WINDOW,
    channel_auth_string,
    rest_string_to_sign,
    sign,
    signin_auth_string,
    verify_auth,
    verify_rest_request,
    webhook_signature,
)

KEY = "278d425bdf160c739803"
SECRET = b"7ad3773142a6692b25b8"
SOCKET_ID = "1234.1234"

PRIVATE_SIG = "58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
USER_SIG = "4708d583dada6a56435fb8bc611c77c359a31eebde13337c16ab43aa6de336ba"
PRESENCE_DATA = '{"user_id":10,"user_info":{"name":"Mr. Channels"}}'
PRESENCE_SIG = "31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80"
PRESENCE_DATA_AS_PRINTED = '{"user_id":10,"user_info":{"name":"Mr. Pusher"}}'
PRESENCE_SIG_AS_PRINTED = "afaed3695da2ffd16931f457e338e6c9f2921fa133ce7dac49f529792be6304c"

REST_BODY = b'{"name":"foo","channels":["project-3"],"data":"{\\"some\\":\\"data\\"}"}'
REST_BODY_MD5 = "ec365a775a4cd0599faeb73354201b6f"
REST_NOW = 1353088179
REST_SIG = "da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
REST_PATH = "/apps/3/events"


# --- channel and user auth vectors (§8.4, §8.5) ----------------------------------


def test_private_channel_vector() -> None:
    message = channel_auth_string(SOCKET_ID, "private-foobar")
    assert message == "1234.1234:private-foobar"
    assert sign(SECRET, message) == PRIVATE_SIG
    assert verify_auth(f"{KEY}:{PRIVATE_SIG}", KEY, [SECRET], message)


def test_user_auth_vector() -> None:
    message = signin_auth_string(SOCKET_ID, '{"id":"12345"}')
    assert message == '1234.1234::user::{"id":"12345"}'
    assert sign(SECRET, message) == USER_SIG
    assert verify_auth(f"{KEY}:{USER_SIG}", KEY, [SECRET], message)


def test_presence_vector_with_the_erratum_pairing() -> None:
    message = channel_auth_string(SOCKET_ID, "presence-foobar", PRESENCE_DATA)
    assert message == f"1234.1234:presence-foobar:{PRESENCE_DATA}"
    assert sign(SECRET, message) == PRESENCE_SIG
    assert verify_auth(f"{KEY}:{PRESENCE_SIG}", KEY, [SECRET], message)


def test_presence_digest_printed_in_the_docs_belongs_to_the_old_text() -> None:
    # §8.5: the docs print afaed369… next to "Mr. Channels"; it is "Mr. Pusher"'s.
    channels = channel_auth_string(SOCKET_ID, "presence-foobar", PRESENCE_DATA)
    printed = channel_auth_string(SOCKET_ID, "presence-foobar", PRESENCE_DATA_AS_PRINTED)
    assert sign(SECRET, printed) == PRESENCE_SIG_AS_PRINTED
    assert not verify_auth(f"{KEY}:{PRESENCE_SIG_AS_PRINTED}", KEY, [SECRET], channels)


def test_channel_data_is_signed_byte_for_byte_not_reserialised() -> None:
    spaced = '{"user_id": 10, "user_info": {"name": "Mr. Channels"}}'
    message = channel_auth_string(SOCKET_ID, "presence-foobar", spaced)
    assert not verify_auth(f"{KEY}:{PRESENCE_SIG}", KEY, [SECRET], message)


def test_empty_channel_data_is_still_part_of_the_string() -> None:
    assert channel_auth_string("1.2", "presence-x", "") == "1.2:presence-x:"
    assert channel_auth_string("1.2", "presence-x") == "1.2:presence-x"


# --- verify_auth refusals ------------------------------------------------------------

PRIVATE_MESSAGE = "1234.1234:private-foobar"


@pytest.mark.parametrize(
    "auth",
    [
        f"other-key:{PRIVATE_SIG}",  # another app's key
        f"{KEY}x:{PRIVATE_SIG}",
        f":{PRIVATE_SIG}",
        f"{KEY.upper()}:{PRIVATE_SIG}",
        f"{KEY}{PRIVATE_SIG}",  # no colon
        PRIVATE_SIG,
        f"{KEY}:",
        f"{KEY}:{PRIVATE_SIG[:-1]}",  # 63 hex digits
        f"{KEY}:{PRIVATE_SIG}0",  # 65
        f"{KEY}:{PRIVATE_SIG}:",
        f"{KEY}:{PRIVATE_SIG.upper()}",  # uppercase hex is refused
        f"{KEY}:{PRIVATE_SIG[:10].upper()}{PRIVATE_SIG[10:]}",
        f"{KEY}:{'0' * 64}",
        f"{KEY}:{PRIVATE_SIG[:-1]}\u00e9",  # non-ASCII in the signature
        f"{KEY}: {PRIVATE_SIG[1:]}",
        "",
        ":",
    ],
)
def test_verify_auth_refuses(auth: str) -> None:
    assert not verify_auth(auth, KEY, [SECRET], PRIVATE_MESSAGE)


def test_verify_auth_splits_at_the_first_colon() -> None:
    # App keys cannot hold a colon, so "key:sig" is split at the first one.
    assert verify_auth(f"{KEY}:{PRIVATE_SIG}", KEY, [SECRET], PRIVATE_MESSAGE)
    assert not verify_auth(f"{KEY}:x:{PRIVATE_SIG}", KEY, [SECRET], PRIVATE_MESSAGE)


def test_signature_for_another_socket_is_refused() -> None:
    assert not verify_auth(
        f"{KEY}:{PRIVATE_SIG}", KEY, [SECRET], channel_auth_string("1234.1235", "private-foobar")
    )


def test_signature_for_another_channel_is_refused() -> None:
    assert not verify_auth(
        f"{KEY}:{PRIVATE_SIG}", KEY, [SECRET], channel_auth_string(SOCKET_ID, "private-foobaz")
    )


def test_verify_auth_accepts_any_active_secret() -> None:
    old, new = b"old-secret", SECRET
    auth = f"{KEY}:{PRIVATE_SIG}"
    assert verify_auth(auth, KEY, [old, new], PRIVATE_MESSAGE)
    assert verify_auth(auth, KEY, [new, old], PRIVATE_MESSAGE)
    assert not verify_auth(auth, KEY, [old], PRIVATE_MESSAGE)
    assert not verify_auth(auth, KEY, [], PRIVATE_MESSAGE)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=100))
def test_verify_auth_never_raises(auth: str) -> None:
    assert verify_auth(auth, KEY, [SECRET], PRIVATE_MESSAGE) is False


@settings(max_examples=100, deadline=None)
@given(
    socket_id=st.from_regex(r"\A[0-9]{1,10}\.[0-9]{1,10}\Z"),
    channel=st.text(alphabet="abcxyz-_", min_size=1, max_size=30),
    secret=st.binary(min_size=1, max_size=40),
)
def test_sign_then_verify_roundtrip(socket_id: str, channel: str, secret: bytes) -> None:
    message = channel_auth_string(socket_id, "private-" + channel)
    auth = f"{KEY}:{sign(secret, message)}"
    assert verify_auth(auth, KEY, [secret], message)
    assert not verify_auth(auth, KEY, [secret + b"x"], message)


@settings(max_examples=200, deadline=None)
@given(
    calls=st.lists(
        st.tuples(
            st.sampled_from([b"", b"k", SECRET, b"s" * 64, b"long-" * 40]) | st.binary(max_size=80),
            st.text(max_size=200),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_sign_is_hmac_sha256_whatever_came_before(calls: list[tuple[bytes, str]]) -> None:
    # sign() copies one keyed HMAC per secret: no call may leave anything in it for
    # the next one (same secret again, another secret between), keys past a block
    # (64 bytes, hashed first) included.
    for secret, message in calls + calls:
        expected = hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()
        assert sign(secret, message) == expected


# --- the official PyPI SDK as the auth endpoint --------------------------------------


@pytest.fixture
def sdk() -> pusher.Pusher:
    return pusher.Pusher(app_id="3", key=KEY, secret=SECRET.decode())


def test_sdk_private_auth_is_accepted(sdk: pusher.Pusher) -> None:
    response = sdk.authenticate(channel="private-foobar", socket_id=SOCKET_ID)
    assert response["auth"] == f"{KEY}:{PRIVATE_SIG}"
    assert verify_auth(
        response["auth"], KEY, [SECRET], channel_auth_string(SOCKET_ID, "private-foobar")
    )


def test_sdk_encrypted_channel_auth_is_accepted() -> None:
    sdk = pusher.Pusher(
        app_id="3",
        key=KEY,
        secret=SECRET.decode(),
        encryption_master_key_base64="MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=",
    )
    response = sdk.authenticate(channel="private-encrypted-foo", socket_id=SOCKET_ID)
    assert "shared_secret" in response  # not part of the signature (§8.2)
    assert verify_auth(
        response["auth"], KEY, [SECRET], channel_auth_string(SOCKET_ID, "private-encrypted-foo")
    )


def test_sdk_presence_auth_is_accepted(sdk: pusher.Pusher) -> None:
    response = sdk.authenticate(
        channel="presence-foobar",
        socket_id=SOCKET_ID,
        custom_data={"user_id": 10, "user_info": {"name": "Mr. Channels"}},
    )
    # The SDK's json.dumps adds spaces; what matters is that the exact string it
    # returns (and pusher-js forwards) is the one verified.
    message = channel_auth_string(SOCKET_ID, "presence-foobar", response["channel_data"])
    assert verify_auth(response["auth"], KEY, [SECRET], message)
    reserialised = json.dumps(json.loads(response["channel_data"]), separators=(",", ":"))
    assert reserialised != response["channel_data"]
    assert not verify_auth(
        response["auth"],
        KEY,
        [SECRET],
        channel_auth_string(SOCKET_ID, "presence-foobar", reserialised),
    )


def test_sdk_user_auth_is_accepted(sdk: pusher.Pusher) -> None:
    response = sdk.authenticate_user(SOCKET_ID, {"id": "12345"})
    message = signin_auth_string(SOCKET_ID, response["user_data"])
    assert verify_auth(response["auth"], KEY, [SECRET], message)


def test_sdk_auth_for_another_socket_is_refused(sdk: pusher.Pusher) -> None:
    response = sdk.authenticate(channel="private-foobar", socket_id="1.2")
    assert not verify_auth(
        response["auth"], KEY, [SECRET], channel_auth_string(SOCKET_ID, "private-foobar")
    )


# --- REST request signing (§15.2) --------------------------------------------------------


def _rest_params(**overrides: str | None) -> list[tuple[str, str]]:
    params: dict[str, str | None] = {
        "auth_key": KEY,
        "auth_timestamp": str(REST_NOW),
        "auth_version": "1.0",
        "body_md5": REST_BODY_MD5,
        "auth_signature": REST_SIG,
    }
    params.update(overrides)
    return [(key, value) for key, value in params.items() if value is not None]


def _verify(
    params: list[tuple[str, str]],
    *,
    body: bytes = REST_BODY,
    now: float = REST_NOW,
    method: str = "POST",
    path: str = REST_PATH,
    secrets: list[bytes] | None = None,
    app_key: str = KEY,
) -> Reason | None:
    return verify_rest_request(
        method=method,
        path=path,
        params=params,
        body=body,
        app_key=app_key,
        secrets=[SECRET] if secrets is None else secrets,
        now=now,
    )


def _resign(
    params: list[tuple[str, str]], secret: bytes = SECRET, **kw: str
) -> list[tuple[str, str]]:
    method = kw.get("method", "POST")
    path = kw.get("path", REST_PATH)
    unsigned = [(k, v) for k, v in params if k != "auth_signature"]
    signature = sign(secret, rest_string_to_sign(method, path, unsigned))
    return [*unsigned, ("auth_signature", signature)]


def test_rest_body_md5_vector() -> None:
    assert hashlib.md5(REST_BODY).hexdigest() == REST_BODY_MD5


def test_rest_string_to_sign_vector() -> None:
    params = [
        ("auth_signature", "ignored"),
        ("body_md5", REST_BODY_MD5),
        ("auth_version", "1.0"),
        ("auth_timestamp", str(REST_NOW)),
        ("auth_key", KEY),
    ]
    expected = (
        "POST\n/apps/3/events\n"
        f"auth_key={KEY}&auth_timestamp={REST_NOW}&auth_version=1.0&body_md5={REST_BODY_MD5}"
    )
    assert rest_string_to_sign("post", REST_PATH, params) == expected
    assert sign(SECRET, expected) == REST_SIG


def test_rest_string_to_sign_lowercases_keys_and_keeps_raw_values() -> None:
    text = rest_string_to_sign("GET", "/apps/3/channels", [("Info", "a b,c&d"), ("B", "é")])
    assert text == "GET\n/apps/3/channels\nb=é&info=a b,c&d"


def test_rest_vector_verifies_at_the_frozen_time() -> None:
    assert _verify(_rest_params()) is None


def test_rest_parameter_order_does_not_matter() -> None:
    assert _verify(list(reversed(_rest_params()))) is None


@pytest.mark.parametrize(
    "missing", ["auth_key", "auth_timestamp", "auth_version", "auth_signature"]
)
def test_rest_missing_auth_param(missing: str) -> None:
    assert _verify(_rest_params(**{missing: None})) is Reason.HTTP_AUTH_MISSING


@pytest.mark.parametrize("empty", ["auth_key", "auth_timestamp", "auth_signature"])
def test_rest_empty_auth_param_counts_as_missing(empty: str) -> None:
    assert _verify(_rest_params(**{empty: ""})) is Reason.HTTP_AUTH_MISSING


@pytest.mark.parametrize("version", ["2.0", "1", "1.0 ", "v1.0"])
def test_rest_bad_version(version: str) -> None:
    assert _verify(_resign(_rest_params(auth_version=version))) is Reason.HTTP_AUTH_VERSION


def test_rest_key_of_another_app_is_refused_even_if_signed_with_its_secret() -> None:
    # Signed correctly by app B (its key and secret) but sent to app A's route.
    params = _resign(_rest_params(auth_key="other-app-key"), secret=b"other-secret")
    assert _verify(params) is Reason.HTTP_AUTH_KEY


@pytest.mark.parametrize("offset", [-601, 601, -10_000, 10_000])
def test_rest_timestamp_outside_the_window(offset: int) -> None:
    assert REST_TIMESTAMP_WINDOW == 600
    assert _verify(_rest_params(), now=REST_NOW + offset) is Reason.HTTP_TIMESTAMP


@pytest.mark.parametrize("offset", [-600, 600, -1, 0.5])
def test_rest_timestamp_inside_the_window(offset: float) -> None:
    assert _verify(_rest_params(), now=REST_NOW + offset) is None


@pytest.mark.parametrize("timestamp", ["abc", "1353088179.0", "1e9", ""])
def test_rest_timestamp_not_an_integer(timestamp: str) -> None:
    expected = Reason.HTTP_AUTH_MISSING if not timestamp else Reason.HTTP_TIMESTAMP
    assert _verify(_resign(_rest_params(auth_timestamp=timestamp))) is expected


def test_rest_body_tampered() -> None:
    tampered = REST_BODY.replace(b"project-3", b"project-4")
    assert _verify(_rest_params(), body=tampered) is Reason.HTTP_BODY_MD5


def test_rest_body_tampered_with_matching_md5_fails_the_signature() -> None:
    tampered = REST_BODY.replace(b"project-3", b"project-4")
    params = _rest_params(body_md5=hashlib.md5(tampered).hexdigest())
    assert _verify(params, body=tampered) is Reason.HTTP_SIGNATURE


def test_rest_body_md5_missing_with_a_body() -> None:
    params = _resign(_rest_params(body_md5=None))
    assert _verify(params) is Reason.HTTP_BODY_MD5


def test_rest_body_md5_uppercase_is_refused() -> None:
    params = _resign(_rest_params(body_md5=REST_BODY_MD5.upper()))
    assert _verify(params) is Reason.HTTP_BODY_MD5


def test_rest_empty_body_without_md5() -> None:
    params = _resign(_rest_params(body_md5=None), method="GET", path="/apps/3/channels")
    assert _verify(params, body=b"", method="GET", path="/apps/3/channels") is None


def test_rest_empty_body_with_the_md5_of_nothing_is_accepted() -> None:
    # The PyPI SDK sends body_md5 of the empty body on every GET.
    empty_md5 = hashlib.md5(b"").hexdigest()
    params = _resign(_rest_params(body_md5=empty_md5), method="GET", path="/apps/3/channels")
    assert _verify(params, body=b"", method="GET", path="/apps/3/channels") is None


def test_rest_empty_body_with_a_wrong_md5_is_refused() -> None:
    params = _resign(_rest_params(), method="GET", path="/apps/3/channels")
    assert _verify(params, body=b"", method="GET", path="/apps/3/channels") is Reason.HTTP_BODY_MD5


def test_rest_wrong_signature() -> None:
    assert _verify(_rest_params(auth_signature="0" * 64)) is Reason.HTTP_SIGNATURE
    assert _verify(_rest_params(), secrets=[b"wrong"]) is Reason.HTTP_SIGNATURE


def test_rest_uppercase_signature_is_refused() -> None:
    assert _verify(_rest_params(auth_signature=REST_SIG.upper())) is Reason.HTTP_SIGNATURE


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", REST_PATH), ("POST", "/apps/3/batch_events"), ("POST", "/apps/4/events")],
)
def test_rest_signature_binds_method_and_path(method: str, path: str) -> None:
    assert _verify(_rest_params(), method=method, path=path) is Reason.HTTP_SIGNATURE


def test_rest_signature_binds_extra_query_params() -> None:
    params = [*_rest_params(), ("info", "user_count")]
    assert _verify(params) is Reason.HTTP_SIGNATURE
    assert _verify(_resign(params)) is None


def test_rest_lowercase_method_is_signed_as_uppercase() -> None:
    assert _verify(_rest_params(), method="post") is None


def test_rest_rotation_accepts_each_active_secret() -> None:
    old, other = b"old-secret", b"other-secret"
    assert _verify(_rest_params(), secrets=[old, SECRET]) is None
    assert _verify(_rest_params(), secrets=[SECRET, old]) is None
    assert _verify(_resign(_rest_params(), secret=old), secrets=[old, SECRET]) is None
    assert _verify(_resign(_rest_params(), secret=other), secrets=[old, SECRET]) is (
        Reason.HTTP_SIGNATURE
    )
    assert _verify(_rest_params(), secrets=[]) is Reason.HTTP_SIGNATURE


@settings(max_examples=200, deadline=None)
@given(
    params=st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20)), max_size=8),
    body=st.binary(max_size=50),
    now=st.floats(allow_nan=False, allow_infinity=False, min_value=0, max_value=4e9),
)
def test_verify_rest_request_never_raises(
    params: list[tuple[str, str]], body: bytes, now: float
) -> None:
    result = _verify(params + _rest_params(), body=body, now=now)
    assert result is None or isinstance(result, Reason)


# --- the official PyPI SDK as the REST caller ---------------------------------------------


def test_sdk_signed_trigger_is_accepted() -> None:
    client = pusher.Pusher(app_id="3", key=KEY, secret=SECRET.decode())._pusher_client
    request = client.trigger.make_request(["project-3"], "foo", {"some": "data"})
    now = int(request.query_params["auth_timestamp"])
    params = list(request.query_params.items())
    accepted = _verify(params, body=request.body, method=request.method, path=request.path, now=now)
    assert accepted is None
    tampered = _verify(params, body=request.body + b" ", path=request.path, now=now)
    assert tampered is Reason.HTTP_BODY_MD5


def test_sdk_signed_get_is_accepted() -> None:
    client = pusher.Pusher(app_id="3", key=KEY, secret=SECRET.decode())._pusher_client
    request = client.channels_info.make_request(
        prefix_filter="presence-", attributes=["user_count"]
    )
    now = int(request.query_params["auth_timestamp"])
    params = list(request.query_params.items())
    assert _verify(params, body=b"", method="GET", path=request.path, now=now) is None


# --- webhooks (§16.1) ------------------------------------------------------------------


def test_webhook_vector() -> None:
    assert webhook_signature(b"secret", b'{"hello":"world"}') == (
        "2677ad3e7c090b2fa2c0fb13020d66d5420879b8316eb356a2d60fb9073bc778"
    )


def test_webhook_signature_is_validated_by_the_sdk() -> None:
    # The SDK also requires time_ms within 5 minutes of its own clock.
    time_ms = int(time.time() * 1000)
    body = json.dumps(
        {"time_ms": time_ms, "events": [{"name": "channel_occupied", "channel": "a"}]}
    )
    signature = webhook_signature(b"secret", body.encode())
    sdk = pusher.Pusher(app_id="1", key="key", secret="secret")
    assert sdk.validate_webhook("key", signature, body) is not None
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    assert sdk.validate_webhook("key", flipped, body) is None
