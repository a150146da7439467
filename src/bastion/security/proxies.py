"""Which address a request comes from, believing proxy headers only from trusted peers.

A peer's ``X-Forwarded-For`` or ``Forwarded`` header is anyone's to write, so it is
read only when the TCP peer itself is in ``trusted_proxies``. The chain is then
walked from the right (the hop nearest to us) past every trusted proxy; the first
address that is not a trusted proxy is the client. A malformed entry stops the
walk: the last address known good is used, never the malformed text.

Pure: addresses and header values in, an address out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["IPNetwork", "TrustedProxies", "parse_ip", "parse_networks"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
    """An address from a header or peer name (IPv4-mapped IPv6 unwrapped), or ``None``."""
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


def _forwarded_for(value: str) -> list[str]:
    """The ``for=`` values of an RFC 7239 ``Forwarded`` header, in order."""
    found = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, item = pair.strip().partition("=")
            if name.strip().lower() == "for":
                found.append(item.strip().strip('"'))
    return found


class TrustedProxies:
    """Resolves the client address of a request.

    Args:
        networks: the CIDRs of proxies whose forwarding headers are believed.
    """

    __slots__ = ("networks",)

    def __init__(self, networks: Sequence[str]) -> None:
        self.networks = parse_networks(networks)

    def trusts(self, address: IPAddress | None) -> bool:
        """Whether ``address`` is a trusted proxy."""
        return address is not None and any(address in net for net in self.networks)

    def client_ip(self, peer: str | None, headers: Sequence[tuple[str, str]]) -> str | None:
        """The client's address for a request from ``peer`` with these ``headers``.

        Header names are matched case-insensitively; several headers of one name
        are read in order, as one comma-separated list.
        """
        peer_address = parse_ip(peer) if peer is not None else None
        if peer_address is None:
            return peer
        if not self.networks or not self.trusts(peer_address):
            return str(peer_address)
        chain: list[str] = []
        xff = [value for name, value in headers if name.lower() == "x-forwarded-for"]
        if xff:
            chain = [item for value in xff for item in value.split(",")]
        else:
            forwarded = [value for name, value in headers if name.lower() == "forwarded"]
            chain = [item for value in forwarded for item in _forwarded_for(value)]
        client = peer_address
        for item in reversed(chain):
            address = parse_ip(item)
            if address is None:
                break
            client = address
            if not self.trusts(address):
                break
        return str(client)
