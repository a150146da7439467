"""Which address a request comes from, believing one proxy header, from trusted peers only.

A forwarding header is anyone's to write, so it is read only when the TCP peer
itself is in ``trusted_proxies``, and only the one header the operator's proxy
sets (``[security] forwarded_header``): ``X-Forwarded-For`` (the default),
``Forwarded`` (RFC 7239, its ``for=`` values) or ``X-Real-IP``. The others are
never read, so a client cannot add a header the proxy does not overwrite and
choose its own address with it. The values are walked from the right (the hop
nearest to us) past every trusted proxy; the first address that is not a trusted
proxy is the client. A malformed entry stops the walk: the last address known
good is used, never the malformed text.

Operator endpoints (``/metrics`` without a token, the admin API, the dashboard)
decide on :attr:`ClientAddress.operator_ip`: the client a trusted proxy named, the
TCP peer when the request carries no forwarding header at all, and nobody (``None``)
when it carries one that no trusted proxy's header resolved. A request that came
through a proxy is never taken for the proxy's own (often loopback) address.

Pure: addresses and header values in, an address out.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

__all__ = [
    "FORWARDING_HEADERS",
    "ClientAddress",
    "ForwardedHeader",
    "IPNetwork",
    "TrustedProxies",
    "ip_text",
    "parse_ip",
    "parse_networks",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The header a trusted proxy names the client in (``[security] forwarded_header``).
ForwardedHeader = Literal["x-forwarded-for", "forwarded", "x-real-ip"]
#: Every header that says a request was forwarded (lower case), believed or not.
FORWARDING_HEADERS: frozenset[str] = frozenset(get_args(ForwardedHeader))


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse CIDRs (a bare address is a /32 or /128).

    Raises:
        ValueError: naming the first entry that is not an address or network.
    """
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def parse_ip(value: str) -> IPAddress | None:
    """An address from a header or peer name (IPv4-mapped IPv6 unwrapped), or ``None``.

    Every connection and forwarded request asks this of a few recurring spellings
    (its peer, its proxies), so short ones are remembered (boundedly); a longer
    text is no address anyone sends and is parsed each time.
    """
    if len(value) <= _REMEMBERED_LENGTH:
        return _remembered_ip(value)
    return _parse_ip(value)


#: Longer than any address with brackets and a port ("[v6%zone]:65535").
_REMEMBERED_LENGTH = 64


def _parse_ip(value: str) -> IPAddress | None:
    text = value.strip()
    if text.startswith("[") and "]" in text:  # Forwarded: "[2001:db8::1]:4711"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:4711"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_remembered_ip = functools.lru_cache(maxsize=4096)(_parse_ip)


def ip_text(value: str) -> str | None:
    """:func:`parse_ip`'s address as text: one spelling per address, or ``None``."""
    if len(value) <= _REMEMBERED_LENGTH:
        return _remembered_text(value)
    return _address_text(value)


def _address_text(value: str) -> str | None:
    address = _parse_ip(value)
    return None if address is None else str(address)


_remembered_text = functools.lru_cache(maxsize=4096)(_address_text)


def _forwarded_for(value: str) -> list[str]:
    """The ``for=`` values of an RFC 7239 ``Forwarded`` header, in order."""
    found = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, item = pair.strip().partition("=")
            if name.strip().lower() == "for":
                found.append(item.strip().strip('"'))
    return found


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """Who sent a request, as far as the TCP peer and the believed header tell.

    Attributes:
        ip: the client's address: the TCP peer unless a trusted proxy named another.
        named: a trusted proxy's header named the client (``ip`` came from it).
        claims_forwarding: the request carries a forwarding header of any kind,
            believed or not.
    """

    ip: str | None
    named: bool = False
    claims_forwarding: bool = False

    @property
    def operator_ip(self) -> str | None:
        """The address operator endpoints decide on; ``None``: no address-based access.

        A request that says it was forwarded but whose client no trusted proxy
        named is not the TCP peer's own: behind a proxy on loopback, every
        internet client would otherwise pass for loopback.
        """
        if self.named or not self.claims_forwarding:
            return self.ip
        return None


#: Peers whose :meth:`TrustedProxies.direct` answer is remembered at once.
DIRECT_ENTRIES = 4096


class TrustedProxies:
    """Resolves the client address of a request.

    Args:
        networks: the CIDRs of proxies whose forwarding header is believed.
        header: the one header those proxies set (lower case); no other is read.
    """

    __slots__ = ("_direct", "header", "networks")

    def __init__(
        self, networks: Sequence[str], header: ForwardedHeader = "x-forwarded-for"
    ) -> None:
        if header not in FORWARDING_HEADERS:
            raise ValueError(f"unknown forwarding header {header!r}")
        self.networks = parse_networks(networks)
        self.header: ForwardedHeader = header
        #: :meth:`direct`'s answers by peer (bounded: emptied when full).
        self._direct: dict[str, ClientAddress] = {}

    def direct(self, peer: str | None) -> ClientAddress:
        """``resolve(peer, ())``: who sent a request without forwarding headers.

        Every WebSocket upgrade asks this, and a peer's answer never changes for
        one set of trusted proxies, so it is remembered (for up to
        :data:`DIRECT_ENTRIES` peers at once).
        """
        if peer is None:
            return self.resolve(None, ())
        known = self._direct.get(peer)
        if known is None:
            if len(self._direct) >= DIRECT_ENTRIES:
                self._direct.clear()
            known = self._direct[peer] = self.resolve(peer, ())
        return known

    def trusts(self, address: IPAddress | None) -> bool:
        """Whether ``address`` is a trusted proxy."""
        return address is not None and any(address in net for net in self.networks)

    def client_ip(self, peer: str | None, headers: Sequence[tuple[str, str]]) -> str | None:
        """The client's address for a request from ``peer`` (see :meth:`resolve`)."""
        return self.resolve(peer, headers).ip

    def resolve(self, peer: str | None, headers: Sequence[tuple[str, str]]) -> ClientAddress:
        """Who sent a request from ``peer`` with these ``headers``.

        Header names are matched case-insensitively; several headers of the
        configured name are read in order, as one comma-separated list.
        """
        claims = any(name.lower() in FORWARDING_HEADERS for name, _ in headers)
        peer_address = parse_ip(peer) if peer is not None else None
        if peer_address is None:
            return ClientAddress(peer, claims_forwarding=claims)
        if not self.networks or not self.trusts(peer_address):
            return ClientAddress(str(peer_address), claims_forwarding=claims)
        values = [value for name, value in headers if name.lower() == self.header]
        if self.header == "forwarded":
            chain = [item for value in values for item in _forwarded_for(value)]
        else:
            chain = [item for value in values for item in value.split(",")]
        client = peer_address
        named = False
        for item in reversed(chain):
            address = parse_ip(item)
            if address is None:
                break
            client = address
            named = True
            if not self.trusts(address):
                break
        return ClientAddress(str(client), named=named, claims_forwarding=claims)
