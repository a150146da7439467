"""The msgspec decoder changes no verdict: same inputs, same messages or same refusals.

Issue #13: a faster parser must not accept anything the standard-library one
refused, nor refuse anything it accepted (duplicate keys, lone surrogates, NaN and
Infinity, overflowing numbers, depth, invalid text). The reference below is the
same decoder with the standard library's parser alone (``codec._loads_exact``, the
parser Bastion used before msgspec); random and adversarial inputs go to both.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.errors import Refused
from bastion.protocol import codec
from bastion.protocol import messages as msg
from bastion.protocol.messages import MAX_JSON_DEPTH, _depth_exceeds, decode_client_message


def verdict(text: str) -> tuple[str, Any]:
    try:
        return ("ok", decode_client_message(text))
    except Refused as refused:
        return ("refused", refused.reason)


def reference_verdict(text: str) -> tuple[str, Any]:
    """The verdict with the standard library's parser alone."""
    fast = msg.loads
    msg.loads = codec._loads_exact  # type: ignore[assignment]
    try:
        return verdict(text)
    finally:
        msg.loads = fast  # type: ignore[assignment]


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
events = st.sampled_from(
    ["pusher:ping", "pusher:subscribe", "pusher:signin", "pusher:x", "client-a", "x", ""]
)


@st.composite
def frames(draw: st.DrawFn) -> str:
    frame: dict[str, Any] = {"event": draw(events)}
    if draw(st.booleans()):
        frame["channel"] = draw(st.text(max_size=10) | st.integers())
    if draw(st.booleans()):
        frame["data"] = draw(values)
    text = json.dumps(frame, ensure_ascii=draw(st.booleans()))
    # Adversarial edits: what JSON parsers disagree on.
    edit = draw(
        st.sampled_from(["none", "nan", "inf", "surrogate", "dup", "deep", "bigexp", "trunc"])
    )
    if edit == "nan":
        text = text.replace('"data": ', '"data": NaN, "x": ', 1)
    elif edit == "inf":
        text = text[:-1] + ', "n": -Infinity}'
    elif edit == "surrogate":
        text = text[:-1] + ', "s": "\\ud800\\udc00\\udfff\\ud83d"}'
    elif edit == "dup":
        text = text[:-1] + ', "event": "client-dup"}'
    elif edit == "deep":
        depth = draw(st.integers(min_value=25, max_value=40))
        text = text[:-1] + ', "d": ' + "[" * depth + "]" * depth + "}"
    elif edit == "bigexp":
        text = text[:-1] + ', "e": 1e' + str(draw(st.integers(300, 400))) + "}"
    elif edit == "trunc":
        text = text[: draw(st.integers(0, len(text)))]
    return text


@settings(max_examples=600, deadline=None)
@given(frames())
def test_frames_get_the_same_verdict_as_with_the_standard_library(text: str) -> None:
    assert verdict(text) == reference_verdict(text)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_text_gets_the_same_verdict(text: str) -> None:
    assert verdict(text) == reference_verdict(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_undecodable_bytes_carried_as_text_get_the_same_verdict(raw: bytes) -> None:
    text = raw.decode("utf-8", "surrogateescape")
    assert verdict(text) == reference_verdict(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"event":"client-a","channel":"private-c","data":"\\ud800"}',  # lone surrogate: kept
        '{"event":"client-a","event":"pusher:ping"}',  # duplicate keys: the last wins
        '{"event":"client-a","channel":"private-c","data":18446744073709551616}',  # exact
        '{"event":"client-a","channel":"private-c","data":1e400}',  # overflow: refused
        '{"event":"client-a","channel":"private-c","data":NaN}',
        "[" * 5000 + "]" * 5000,  # too deep for msgspec: the standard library decides
        '{"event":"client-a","data":' + "[" * 40 + "]" * 40 + "}",  # deeper than 32
    ],
)
def test_known_disagreements_between_parsers_keep_the_old_verdict(text: str) -> None:
    assert verdict(text) == reference_verdict(text)


@given(values)
def test_the_bracket_count_never_hides_a_value_that_is_too_deep(value: Any) -> None:
    """The depth walk is skipped only when the text has at most 32 opening brackets."""
    text = json.dumps({"event": "client-x", "data": value})
    if text.count("{") + text.count("[") <= MAX_JSON_DEPTH:
        assert not _depth_exceeds(json.loads(text), MAX_JSON_DEPTH)
