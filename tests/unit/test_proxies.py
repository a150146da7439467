"""TrustedProxies: one forwarding header, believed only from trusted peers."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.security.proxies import ClientAddress, TrustedProxies, parse_ip, parse_networks

PROXY = "10.0.0.1"


def test_untrusted_peer_ignores_forwarding_headers() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    headers = [("X-Forwarded-For", "198.51.100.7"), ("Forwarded", "for=198.51.100.8")]
    assert proxies.client_ip("203.0.113.5", headers) == "203.0.113.5"


def test_no_trusted_proxies_means_the_peer() -> None:
    assert TrustedProxies([]).client_ip("127.0.0.1", [("x-forwarded-for", "1.2.3.4")]) == (
        "127.0.0.1"
    )


def test_trusted_peer_names_the_client_from_the_right() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    # A client may prepend anything; only the hop our proxy appended counts.
    headers = [("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 10.0.0.2")]
    assert proxies.client_ip(PROXY, headers) == "198.51.100.7"


def test_several_xff_headers_read_as_one_list() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    headers = [("x-forwarded-for", "198.51.100.1"), ("X-Forwarded-For", "198.51.100.2")]
    assert proxies.client_ip(PROXY, headers) == "198.51.100.2"


def test_forwarded_header_when_configured() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"], "forwarded")
    headers = [("Forwarded", 'for="[2001:db8::1]:4711";proto=https, for=10.0.0.3')]
    assert proxies.client_ip(PROXY, headers) == "2001:db8::1"


def test_a_client_written_xff_never_beats_the_rfc_7239_proxy() -> None:
    # The proxy sets Forwarded and passes the client's own X-Forwarded-For untouched.
    proxies = TrustedProxies(["10.0.0.0/8"], "forwarded")
    headers = [("X-Forwarded-For", "192.0.2.66"), ("Forwarded", "for=198.51.100.7")]
    assert proxies.client_ip(PROXY, headers) == "198.51.100.7"
    # Without a Forwarded header the client is the proxy, never the XFF claim.
    assert proxies.client_ip(PROXY, [("X-Forwarded-For", "192.0.2.66")]) == PROXY


def test_by_default_only_x_forwarded_for_is_read() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.header == "x-forwarded-for"
    for name in ("Forwarded", "X-Real-IP"):
        value = "for=192.0.2.66" if name == "Forwarded" else "192.0.2.66"
        assert proxies.client_ip(PROXY, [(name, value)]) == PROXY
    headers = [("Forwarded", "for=192.0.2.66"), ("X-Forwarded-For", "198.51.100.7")]
    assert proxies.client_ip(PROXY, headers) == "198.51.100.7"


def test_x_real_ip_when_configured() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"], "x-real-ip")
    headers = [("X-Forwarded-For", "192.0.2.66"), ("x-real-ip", "198.51.100.7")]
    assert proxies.client_ip(PROXY, headers) == "198.51.100.7"
    assert proxies.client_ip(PROXY, [("X-Forwarded-For", "192.0.2.66")]) == PROXY


def test_unknown_header_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown forwarding header"):
        TrustedProxies([], "via")  # type: ignore[arg-type]


# --- the operator address -----------------------------------------------------------


def test_operator_address_is_the_peer_without_forwarding_headers() -> None:
    resolved = TrustedProxies(["127.0.0.1/32"]).resolve("127.0.0.1", [("Host", "x")])
    assert resolved == ClientAddress("127.0.0.1", named=False, claims_forwarding=False)
    assert resolved.operator_ip == "127.0.0.1"


def test_operator_address_is_the_client_a_trusted_proxy_named() -> None:
    proxies = TrustedProxies(["127.0.0.1/32"])
    # nginx on loopback appends the internet client's address after the client's claim.
    resolved = proxies.resolve("127.0.0.1", [("X-Forwarded-For", "127.0.0.1, 203.0.113.5")])
    assert resolved.named and resolved.operator_ip == "203.0.113.5"
    # A client on the proxy's own host, through the proxy: loopback, named by the proxy.
    assert proxies.resolve("127.0.0.1", [("X-Forwarded-For", "127.0.0.1")]).operator_ip == (
        "127.0.0.1"
    )


@pytest.mark.parametrize(
    ("networks", "header", "value"),
    [
        pytest.param([], "X-Forwarded-For", "203.0.113.5", id="no-trusted-proxies"),
        pytest.param(["127.0.0.1/32"], "Forwarded", "for=203.0.113.5", id="other-header"),
        pytest.param(["127.0.0.1/32"], "X-Real-IP", "203.0.113.5", id="x-real-ip"),
        pytest.param(["127.0.0.1/32"], "X-Forwarded-For", "unknown", id="malformed"),
        pytest.param(["127.0.0.1/32"], "X-Forwarded-For", "", id="empty"),
    ],
)
def test_a_forwarded_request_no_trusted_header_resolves_has_no_operator_address(
    networks: list[str], header: str, value: str
) -> None:
    resolved = TrustedProxies(networks).resolve("127.0.0.1", [(header, value)])
    assert resolved.ip == "127.0.0.1"  # limits still apply to the peer
    assert resolved.claims_forwarding and resolved.operator_ip is None


def test_malformed_entry_stops_the_walk_at_the_last_good_address() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    headers = [("X-Forwarded-For", "198.51.100.7, not-an-ip, 10.0.0.2")]
    assert proxies.client_ip(PROXY, headers) == "10.0.0.2"
    assert proxies.client_ip(PROXY, [("X-Forwarded-For", "garbage")]) == PROXY


def test_ipv4_mapped_peer_is_unwrapped() -> None:
    assert TrustedProxies([]).client_ip("::ffff:192.0.2.1", []) == "192.0.2.1"
    assert parse_ip("192.0.2.1:4711") == ipaddress.ip_address("192.0.2.1")
    assert parse_ip("[2001:db8::1]:80") == ipaddress.ip_address("2001:db8::1")
    assert parse_ip("nope") is None


def test_parse_networks_names_a_bad_entry() -> None:
    assert parse_networks(["127.0.0.1"]) == (ipaddress.ip_network("127.0.0.1/32"),)
    with pytest.raises(ValueError, match="'bogus'"):
        parse_networks(["10.0.0.0/8", "bogus"])


# --- properties ------------------------------------------------------------------------

_v4 = st.ip_addresses(v=4).map(str)
_items = st.one_of(_v4, st.ip_addresses(v=6).map(str), st.text(max_size=12))
_header_names = st.sampled_from(
    ["X-Forwarded-For", "x-forwarded-for", "Forwarded", "X-Real-IP", "Via"]
)
_configured = st.sampled_from(["x-forwarded-for", "forwarded", "x-real-ip"])
_headers = st.lists(
    st.tuples(_header_names, st.lists(_items, max_size=4).map(", ".join)), max_size=4
)
_networks = st.lists(
    st.sampled_from(["10.0.0.0/8", "127.0.0.1/32", "192.168.0.0/16", "::1/128"]), max_size=3
)


@settings(max_examples=300, deadline=None)
@given(networks=_networks, peer=_v4, headers=_headers)
def test_an_untrusted_peer_never_depends_on_headers(
    networks: list[str], peer: str, headers: list[tuple[str, str]]
) -> None:
    proxies = TrustedProxies(networks)
    if proxies.trusts(parse_ip(peer)):
        return
    assert proxies.client_ip(peer, headers) == proxies.client_ip(peer, []) == peer


@settings(max_examples=300, deadline=None)
@given(networks=_networks, peer=_v4, headers=_headers)
def test_the_answer_is_the_peer_or_an_address_from_the_headers(
    networks: list[str], peer: str, headers: list[tuple[str, str]]
) -> None:
    answer = TrustedProxies(networks).client_ip(peer, headers)
    assert answer is not None
    if answer == peer:
        return
    address = ipaddress.ip_address(answer)
    named = {parse_ip(part) for _, value in headers for part in value.replace(";", ",").split(",")}
    named |= {
        parse_ip(part.split("=", 1)[1].strip('"'))
        for _, value in headers
        for part in value.replace(";", ",").split(",")
        if "=" in part
    }
    assert address in named


@settings(max_examples=300, deadline=None)
@given(networks=_networks, peer=_v4, headers=_headers, header=_configured)
def test_only_the_configured_header_is_ever_read(
    networks: list[str], peer: str, headers: list[tuple[str, str]], header: str
) -> None:
    proxies = TrustedProxies(networks, header)  # type: ignore[arg-type]
    own = [(name, value) for name, value in headers if name.lower() == header]
    assert proxies.client_ip(peer, headers) == proxies.client_ip(peer, own)


@settings(max_examples=200)
@given(
    st.one_of(st.none(), st.ip_addresses().map(str), st.text(max_size=20)),
    st.sampled_from([(), ("10.0.0.0/8",), ("0.0.0.0/0", "::/0")]),
)
def test_direct_answers_what_resolve_answers_without_headers(
    peer: str | None, networks: tuple[str, ...]
) -> None:
    proxies = TrustedProxies(networks)
    first = proxies.direct(peer)
    assert first == proxies.resolve(peer, ())
    assert proxies.direct(peer) == first  # remembered, the same answer


def test_direct_remembers_a_bounded_number_of_peers() -> None:
    from bastion.security import proxies as module

    proxies = TrustedProxies(())
    for index in range(module.DIRECT_ENTRIES + 10):
        address = f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"
        assert proxies.direct(address) == ClientAddress(address)
    assert len(proxies._direct) <= module.DIRECT_ENTRIES
