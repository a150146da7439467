"""The front door's own HTTP pieces: query decoding and response bytes."""

from __future__ import annotations

from urllib.parse import parse_qsl

import httptools
from hypothesis import given
from hypothesis import strategies as st

from bastion.api.http import HttpResponse, query_pairs

_QUERY = st.text(alphabet="ab=&+%2FAE0é ;", max_size=40) | st.lists(
    st.tuples(st.text(max_size=8), st.text(max_size=8))
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))


@given(_QUERY)
def test_query_pairs_are_what_parse_qsl_keeping_blanks_gives(query: str) -> None:
    assert query_pairs(query) == parse_qsl(query, keep_blank_values=True)


def test_query_pairs_decode_plus_and_percent_and_keep_blanks() -> None:
    assert query_pairs("a=1&&b&c=&d=x+y%2Fz&e=%zz&=v") == [
        ("a", "1"),
        ("b", ""),
        ("c", ""),
        ("d", "x y/z"),
        ("e", "%zz"),
        ("", "v"),
    ]


class _Parsed:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = b""
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def _parse(raw: bytes) -> tuple[int, _Parsed]:
    parsed = _Parsed()
    parser = httptools.HttpResponseParser(parsed)
    parser.feed_data(raw)
    return parser.get_status_code(), parsed


def test_a_response_is_one_valid_http_message() -> None:
    response = HttpResponse(429, b'{"x":1}', headers=(("Retry-After", "3"),))
    status, parsed = _parse(response.encode(keep_alive=True))
    assert status == 429
    assert parsed.complete
    assert parsed.body == b'{"x":1}'
    assert parsed.headers == {
        "content-type": "application/json",
        "content-length": "7",
        "connection": "keep-alive",
        "retry-after": "3",
    }
    raw = response.encode(keep_alive=False)
    assert raw.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"\r\nConnection: close\r\n" in raw


def test_a_head_answer_has_the_get_headers_and_no_body() -> None:
    response = HttpResponse(200, b"{}")
    raw = response.encode(keep_alive=True, head=True)
    assert raw.endswith(b"\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\n")


def test_a_204_has_no_content_length() -> None:
    raw = HttpResponse(204, b"").encode(keep_alive=True)
    assert raw == b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\n\r\n"
