"""Channel classification and the name rules of the protocol (spec §5, §3.1, §9)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.protocol.names import (
    CLIENT_EVENT_PREFIX,
    MAX_USER_ID_LENGTH,
    RESERVED_EVENT_PREFIXES,
    SERVER_TO_USER_PREFIX,
    ChannelKind,
    ChannelType,
    classify_channel,
    is_client_event_name,
    is_valid_channel_name,
    is_valid_event_name,
    is_valid_identity,
    is_valid_presence_user_id,
    is_valid_socket_id,
    is_valid_user_id,
)

DEFAULT_CHANNEL_LENGTH = 164
DEFAULT_EVENT_LENGTH = 200

# --- classification ---------------------------------------------------------------

CLASSIFICATION = [
    # name, kind, cached, needs_auth, allows_client_events
    ("my-channel", ChannelKind.PUBLIC, False, False, False),
    ("private-foo", ChannelKind.PRIVATE, False, True, True),
    ("private-encrypted-foo", ChannelKind.ENCRYPTED, False, True, False),
    ("presence-foo", ChannelKind.PRESENCE, False, True, True),
    ("cache-foo", ChannelKind.PUBLIC, True, False, False),
    ("private-cache-foo", ChannelKind.PRIVATE, True, True, True),
    ("private-encrypted-cache-foo", ChannelKind.ENCRYPTED, True, True, False),
    ("presence-cache-foo", ChannelKind.PRESENCE, True, True, True),
    ("#server-to-user-42", ChannelKind.SERVER_TO_USER, False, False, False),
]


@pytest.mark.parametrize(("name", "kind", "cached", "needs_auth", "client_events"), CLASSIFICATION)
def test_every_prefix_is_classified(
    name: str, kind: ChannelKind, cached: bool, needs_auth: bool, client_events: bool
) -> None:
    channel_type = classify_channel(name)
    assert channel_type == ChannelType(kind, cached=cached)
    assert channel_type.needs_auth is needs_auth
    assert channel_type.allows_client_events is client_events


@pytest.mark.parametrize(
    "prefix",
    [
        "private-",
        "private-encrypted-",
        "presence-",
        "cache-",
        "private-cache-",
        "private-encrypted-cache-",
        "presence-cache-",
    ],
)
def test_the_bare_prefix_is_classified_like_a_name_with_it(prefix: str) -> None:
    assert classify_channel(prefix) == classify_channel(prefix + "x")


@pytest.mark.parametrize(
    "name",
    [
        # The unanchored-regex mistake (soketi, Sockudo) would call these cache or
        # private channels; anchored classification makes them plain public ones.
        "my-cache-channel",
        "xcache-foo",
        "foo-private-bar",
        "public-private-encrypted-x",
        "not-presence-foo",
        "a-presence-cache-b",
        "Private-foo",
        "PRESENCE-foo",
        "Cache-foo",
        " private-foo",
        "_private-foo",
        "server-to-user-1",
        "x#server-to-user-1",
    ],
)
def test_names_that_merely_contain_a_prefix_are_public_and_need_no_auth(name: str) -> None:
    channel_type = classify_channel(name)
    assert channel_type.kind is ChannelKind.PUBLIC
    assert channel_type.cached is False
    assert channel_type.needs_auth is False
    assert channel_type.allows_client_events is False


def test_cache_mid_string_after_a_real_prefix_keeps_the_real_prefix() -> None:
    # "private-my-cache-x" is private (anchored) but not a cache channel.
    assert classify_channel("private-my-cache-x") == ChannelType(ChannelKind.PRIVATE)
    assert classify_channel("presence-my-cache-x") == ChannelType(ChannelKind.PRESENCE)


def test_longest_prefix_wins() -> None:
    assert classify_channel("private-encrypted-cache-x").kind is ChannelKind.ENCRYPTED
    assert classify_channel("private-encrypted-x").kind is ChannelKind.ENCRYPTED
    assert classify_channel("private-encryptedx").kind is ChannelKind.PRIVATE


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_classify_never_raises_and_needs_auth_iff_private_or_presence_prefix(name: str) -> None:
    channel_type = classify_channel(name)
    assert channel_type.needs_auth is name.startswith(("private-", "presence-"))
    assert channel_type.cached is name.startswith(
        ("cache-", "private-cache-", "private-encrypted-cache-", "presence-cache-")
    )


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["", "x", "my-", "foo_", "public-"]),
    st.sampled_from(["private-", "presence-", "cache-", "private-encrypted-"]),
    st.text(alphabet="abc-_", max_size=10),
)
def test_a_prefix_not_at_position_zero_never_needs_auth(lead: str, prefix: str, tail: str) -> None:
    name = lead + prefix + tail
    if lead:
        assert classify_channel(name).needs_auth is False
    else:
        assert classify_channel(name).needs_auth is (prefix != "cache-")


# --- channel names ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "my-channel",
        "private-foo",
        "presence-cache-room_1",
        "Aa0_-=@,.;",
        "a" * DEFAULT_CHANNEL_LENGTH,
        "#server-to-user-42",
        "#server-to-user-alice@example.com",
    ],
)
def test_valid_channel_names(name: str) -> None:
    assert is_valid_channel_name(name, DEFAULT_CHANNEL_LENGTH)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * (DEFAULT_CHANNEL_LENGTH + 1),
        "has space",
        "colon:name",
        "slash/name",
        "star*",
        "quote'",
        "newline\n",
        "trailing-newline\n",
        "tab\t",
        "nul\x00",
        "unicode-\u00e9",
        "emoji-\U0001f600",
        "fullwidth-\uff41",
        "hash#inside",
        "#hash-first",
        "#server-to-user-",
        "#server-to-user-a#b",
        "#server-to-user-a b",
        "private-#server-to-user-1",
        "#Server-to-user-1",
    ],
)
def test_invalid_channel_names(name: str) -> None:
    assert not is_valid_channel_name(name, DEFAULT_CHANNEL_LENGTH)


def test_channel_length_counts_the_prefix_and_is_configurable() -> None:
    name = "private-" + "x" * (DEFAULT_CHANNEL_LENGTH - len("private-"))
    assert len(name) == DEFAULT_CHANNEL_LENGTH
    assert is_valid_channel_name(name, DEFAULT_CHANNEL_LENGTH)
    assert not is_valid_channel_name(name + "x", DEFAULT_CHANNEL_LENGTH)
    assert is_valid_channel_name(name + "x", 200)
    assert not is_valid_channel_name("abcd", 3)


def test_server_to_user_name_counts_towards_the_length_limit() -> None:
    name = SERVER_TO_USER_PREFIX + "u" * (DEFAULT_CHANNEL_LENGTH - len(SERVER_TO_USER_PREFIX))
    assert is_valid_channel_name(name, DEFAULT_CHANNEL_LENGTH)
    assert not is_valid_channel_name(name + "u", DEFAULT_CHANNEL_LENGTH)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_a_hash_is_only_ever_valid_in_the_server_to_user_form(name: str) -> None:
    if "#" in name and is_valid_channel_name(name, DEFAULT_CHANNEL_LENGTH):
        assert name.startswith(SERVER_TO_USER_PREFIX)
        assert name.count("#") == 1


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="AZaz09_-=@,.;", min_size=1, max_size=DEFAULT_CHANNEL_LENGTH))
def test_every_name_from_the_documented_charset_is_valid(name: str) -> None:
    assert is_valid_channel_name(name, DEFAULT_CHANNEL_LENGTH)


# --- event names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["e", "my-event", "client-typing", "with space", "ünïcode", "x" * 200]
)
def test_valid_event_names(name: str) -> None:
    assert is_valid_event_name(name, DEFAULT_EVENT_LENGTH)


@pytest.mark.parametrize("name", ["", "x" * 201, "nul\x00", "line\nbreak", "del\x7f", "esc\x1b"])
def test_invalid_event_names(name: str) -> None:
    assert not is_valid_event_name(name, DEFAULT_EVENT_LENGTH)


def test_event_name_length_is_configurable() -> None:
    assert is_valid_event_name("x" * 300, 300)
    assert not is_valid_event_name("x" * 301, 300)


def test_reserved_event_prefixes_are_the_pusher_ones() -> None:
    assert RESERVED_EVENT_PREFIXES == ("pusher:", "pusher_internal:")
    assert CLIENT_EVENT_PREFIX == "client-"


@pytest.mark.parametrize("name", ["client-", "client-typing", "client-a b", "client-" + "x" * 193])
def test_client_event_names(name: str) -> None:
    assert is_client_event_name(name, DEFAULT_EVENT_LENGTH)


@pytest.mark.parametrize(
    "name",
    [
        "my-client-x",  # the prefix is what counts, not a substring
        "xclient-x",
        "Client-x",
        "CLIENT-x",
        "client",
        "client_x",
        " client-x",
        "pusher:client-x",
        "pusher_internal:x",
        "hello",
        "client-" + "x" * 194,  # 201 characters
        "client-\x00",
    ],
)
def test_not_client_event_names(name: str) -> None:
    assert not is_client_event_name(name, DEFAULT_EVENT_LENGTH)


# --- socket ids ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "socket_id", ["1.1", "123.456", "1234.1234", "0.0", "9" * 20 + "." + "9" * 20]
)
def test_valid_socket_ids(socket_id: str) -> None:
    assert is_valid_socket_id(socket_id)


@pytest.mark.parametrize(
    "socket_id",
    [
        "",
        "1",
        "1.",
        ".1",
        "1..1",
        "1.1.1",
        "a.1",
        "1.a",
        "-1.1",
        "1.1 ",
        " 1.1",
        "1.1\n",
        "1,1",
        "1:1",
        "9" * 21 + ".1",
        "1." + "9" * 21,
        "1.2e3",
    ],
)
def test_invalid_socket_ids(socket_id: str) -> None:
    assert not is_valid_socket_id(socket_id)


@pytest.mark.parametrize("socket_id", ["\u0661\u0662.\u0663", "\uff11.\uff12", "\u0967.\u0967"])
def test_socket_ids_are_ascii_digits_only(socket_id: str) -> None:
    assert not is_valid_socket_id(socket_id)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**20 - 1), st.integers(0, 10**20 - 1))
def test_generated_style_socket_ids_are_valid(a: int, b: int) -> None:
    assert is_valid_socket_id(f"{a}.{b}")


# --- user ids ------------------------------------------------------------------------


@pytest.mark.parametrize("user_id", ["1", "alice", "alice@example.com", "u" * MAX_USER_ID_LENGTH])
def test_valid_user_ids(user_id: str) -> None:
    assert is_valid_user_id(user_id)


@pytest.mark.parametrize(
    "user_id", ["", "u" * (MAX_USER_ID_LENGTH + 1), "a\x00b", "line\nbreak", "tab\t", "del\x7f"]
)
def test_invalid_user_ids(user_id: str) -> None:
    assert not is_valid_user_id(user_id)


def test_user_id_limit_is_pusher_128() -> None:
    assert MAX_USER_ID_LENGTH == 128


@pytest.mark.parametrize("user_id", ["alice smith", "a:b", "a#b", "\u00fc", "a+b", "a/b"])
def test_user_ids_outside_the_channel_charset_are_refused(user_id: str) -> None:
    # Spec §5.2/§9.1: so that #server-to-user-{id} is always a valid channel name.
    assert not is_valid_user_id(user_id)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=MAX_USER_ID_LENGTH + 5))
def test_a_valid_user_id_always_has_a_valid_server_to_user_channel(user_id: str) -> None:
    if is_valid_user_id(user_id):
        assert is_valid_channel_name(SERVER_TO_USER_PREFIX + user_id, DEFAULT_CHANNEL_LENGTH)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="AZaz09_-=@,.;", min_size=1, max_size=MAX_USER_ID_LENGTH))
def test_every_charset_user_id_has_a_valid_server_to_user_channel(user_id: str) -> None:
    assert is_valid_user_id(user_id)
    assert is_valid_channel_name(SERVER_TO_USER_PREFIX + user_id, DEFAULT_CHANNEL_LENGTH)


# --- identity strings: presence user ids, sign-in ids, watchlist entries, JWT sub ----------

#: Refused in every identity string, byte for byte (Python escapes).
BAD_IDENTITIES = [
    "\ud800x",  # a lone high surrogate, as JSON "\ud800x" decodes
    "x\udfff",  # a lone low surrogate
    "\ud83d",  # half of an emoji's pair
    "\ude00\ud83d",  # both halves, in the wrong order: still two lone surrogates
    "a\x00b",
    "line\nbreak",
    "tab\t",
    "esc\x1b[31m",
    "del\x7f",
    "c1-\x80",
    "nel\x85",  # NEXT LINE, a C1 control some log viewers break lines at
    "csi\x9b31m",  # the one-byte CSI of 8-bit terminals
    "c1-\x9f",
    "",
    "u" * (MAX_USER_ID_LENGTH + 1),
]

#: Accepted as presence user ids (the looser rule).
GOOD_PRESENCE_IDS = [
    "1",
    "alice",
    "alice+tag@example.com",
    "Zo\u00eb",
    "\u674e\u96f7",
    "\U0001f600",  # an emoji: one code point, no surrogate left once decoded
    "\u00a0nbsp",  # not a control character
    "\xa0\xff",  # just above the C1 range
    "u" * MAX_USER_ID_LENGTH,
]


@pytest.mark.parametrize("user_id", BAD_IDENTITIES, ids=ascii)
def test_lone_surrogates_and_control_characters_are_never_an_identity(user_id: str) -> None:
    assert not is_valid_identity(user_id)
    assert not is_valid_presence_user_id(user_id)
    assert not is_valid_user_id(user_id)


@pytest.mark.parametrize("user_id", GOOD_PRESENCE_IDS, ids=ascii)
def test_presence_user_ids_may_be_any_other_text(user_id: str) -> None:
    assert is_valid_identity(user_id)
    assert is_valid_presence_user_id(user_id)


def test_what_json_escapes_produce() -> None:
    assert not is_valid_presence_user_id(json.loads('"\\ud800x"'))
    assert not is_valid_presence_user_id(json.loads('"nel\\u0085"'))
    paired = json.loads('"\\ud83d\\ude00"')  # a proper pair decodes to one code point
    assert paired == "\U0001f600" and is_valid_presence_user_id(paired)


def _forbidden(char: str) -> bool:
    code = ord(char)
    return code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF


@settings(max_examples=1000)
@given(text=st.text(st.characters(exclude_categories=()), max_size=MAX_USER_ID_LENGTH + 2))
def test_an_identity_is_short_text_with_no_control_or_surrogate(text: str) -> None:
    expected = 0 < len(text) <= MAX_USER_ID_LENGTH and not any(map(_forbidden, text))
    assert is_valid_identity(text) is expected
    assert is_valid_presence_user_id(text) is expected
    if expected:
        text.encode("utf-8")  # what Redis, SQLite and the logs need: never raises
    if is_valid_user_id(text):
        assert expected  # the sign-in rule is the stricter one
