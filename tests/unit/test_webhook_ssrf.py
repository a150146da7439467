"""The ``webhooks_refuse_private`` address filter: only globally routable targets pass.

Pure: :func:`is_refused_address` takes the text of one resolved address. The
tables spell out each special-purpose block and each way of wrapping an IPv4
address in IPv6 (mapped, 6to4, NAT64); the properties check that wrapping never
changes the answer and that nothing accepted is outside the global unicast space.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.webhooks.dispatcher import is_refused_address


def mapped(v4: ipaddress.IPv4Address) -> str:
    return str(ipaddress.IPv6Address(0xFFFF_0000_0000 | int(v4)))


def sixtofour(v4: ipaddress.IPv4Address, suffix: int = 1) -> str:
    return str(ipaddress.IPv6Address((0x2002 << 112) | (int(v4) << 80) | suffix))


def nat64(v4: ipaddress.IPv4Address) -> str:
    return str(ipaddress.IPv6Address((0x0064_FF9B << 96) | int(v4)))


METADATA = ipaddress.IPv4Address("100.100.100.200")  # Alibaba Cloud's metadata service


@pytest.mark.parametrize(
    "address",
    [
        # carrier-grade NAT (RFC 6598), cloud metadata endpoints live there
        "100.64.0.1",
        "100.100.100.200",
        "100.127.255.254",
        "::ffff:100.100.100.200",
        "::ffff:6464:64c8",
        # 6to4 wrapping private, loopback, link-local and CGNAT IPv4
        "2002:a00:1::1",
        "2002:7f00:1::",
        "2002:a9fe:a9fe::1",
        "2002:6464:64c8::1",
        "2002:c0a8:101:1::1",
        # NAT64 (well-known prefix) wrapping internal IPv4
        "64:ff9b::a00:1",
        "64:ff9b::7f00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::6464:64c8",
        # the local-use NAT64 prefix: where it embeds IPv4 is a local choice
        "64:ff9b:1::5db8:d822",
        "64:ff9b:1:2::1",
        # Teredo: refused outright (obfuscated client, third-party relays)
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "2001::1",
        # IPv4-compatible and IPv4-translated forms (deprecated)
        "::a00:1",
        "::5db8:d822",
        "::ffff:0:5db8:d822",
        # classic private, loopback, link-local, multicast, reserved, unspecified
        "127.0.0.1",
        "::1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "fe80::1",
        "fe80::1%eth0",
        "fc00::1",
        "fd00:ec2::254",  # AWS metadata over IPv6
        "fec0::1",  # site-local (deprecated)
        "224.0.0.1",
        "239.255.255.250",
        "ff02::1",
        "ff0e::1",
        "0.0.0.0",
        "0.1.2.3",
        "::",
        "240.0.0.1",
        "255.255.255.255",
        # documentation, benchmarking and protocol-assignment blocks
        "192.0.0.9",
        "192.0.0.170",
        "192.0.2.1",
        "198.18.0.1",
        "198.51.100.1",
        "203.0.113.1",
        "192.88.99.1",
        "2001:db8::1",
        "3fff::1",
        "2001:2::1",
        "2001:10::1",
        "100::1",
        "5f00::1",
        # unallocated IPv6 space
        "4000::1",
        "e000::1",
        # not an address at all
        "not-an-ip",
        "",
        "1684301000",
        "100.100.100.200.",
        "2002:a00:1::1%",
    ],
)
def test_refused(address: str) -> None:
    assert is_refused_address(address) is True


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "8.8.8.8",
        "1.1.1.1",
        "100.63.255.255",  # just below 100.64.0.0/10
        "100.128.0.0",  # just above it
        "::ffff:93.184.216.34",
        "2002:5db8:d822::1",  # 6to4 of a public address
        "64:ff9b::5db8:d822",  # NAT64 of a public address
        "2606:2800:220:1:248:1893:25c8:1946",
        "2a00:1450:4001:80b::200e",
    ],
)
def test_accepted(address: str) -> None:
    assert is_refused_address(address) is False


_IPV4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
_IPV6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


@settings(max_examples=2000)
@given(v4=_IPV4, suffix=st.integers(0, 2**80 - 1))
def test_wrapping_an_ipv4_address_never_changes_the_answer(
    v4: ipaddress.IPv4Address, suffix: int
) -> None:
    answer = is_refused_address(str(v4))
    assert is_refused_address(mapped(v4)) is answer
    assert is_refused_address(sixtofour(v4, suffix)) is answer
    assert is_refused_address(nat64(v4)) is answer


@settings(max_examples=2000)
@given(ip=st.one_of(_IPV4, _IPV6))
def test_whatever_is_accepted_is_global_unicast(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    if is_refused_address(str(ip)):
        return
    target = ip
    if isinstance(ip, ipaddress.IPv6Address):
        assert ip in ipaddress.IPv6Network("2000::/3") or ip.ipv4_mapped or ip in _NAT64
        target = ip.ipv4_mapped or ip.sixtofour or _nat64_embedded(ip) or ip
    assert target.is_global
    assert not (
        target.is_private
        or target.is_loopback
        or target.is_link_local
        or target.is_multicast
        or target.is_reserved
        or target.is_unspecified
    )
    if isinstance(target, ipaddress.IPv4Address):
        assert target not in ipaddress.IPv4Network("100.64.0.0/10")
    else:
        assert target.teredo is None and not target.is_site_local


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _nat64_embedded(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF) if ip in _NAT64 else None


_SPECIAL = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
]


@given(block=st.sampled_from(_SPECIAL), offset=st.integers(0, 2**32 - 1))
def test_every_address_of_a_special_ipv4_block_is_refused_in_every_form(
    block: str, offset: int
) -> None:
    network = ipaddress.IPv4Network(block)
    v4 = network[offset % network.num_addresses]
    assert is_refused_address(str(v4))
    assert is_refused_address(mapped(v4))
    assert is_refused_address(sixtofour(v4))
    assert is_refused_address(nat64(v4))


@given(text=st.text(max_size=60))
def test_any_text_gets_an_answer(text: str) -> None:
    assert isinstance(is_refused_address(text), bool)
