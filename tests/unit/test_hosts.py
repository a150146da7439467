"""HostPolicy: the Host header of an operator request must name this server."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.security.hosts import HostPolicy, host_name


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LOCALHOST:6001",
        "localhost.",
        "127.0.0.1",
        "127.0.0.1:6001",
        "[::1]",
        "[::1]:6001",
        "10.0.0.5:9100",  # a scraper on the network, by address
        "[2001:db8::1]:443",
        "bastion.internal",  # [server] host
        "ops.example.com:8443",  # allowed_hosts
    ],
)
def test_names_of_this_server_are_allowed(host: str) -> None:
    policy = HostPolicy("bastion.internal", ["ops.example.com"])
    assert policy.allows([host])


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",  # DNS rebinding: a name re-pointed at loopback
        "evil.example:6001",
        "127.0.0.1.nip.io",
        "localhost.evil.example",
        "app.localhost",
        "::1",  # unbracketed IPv6 is not a valid Host
        "[192.0.2.1]",
        "[::1",
        "127.0.0.1:port",
        "",
        " ",
    ],
)
def test_other_names_are_refused(host: str) -> None:
    assert not HostPolicy("127.0.0.1").allows([host])


def test_no_host_passes_and_several_are_ambiguous() -> None:
    policy = HostPolicy("127.0.0.1")
    assert policy.allows([])  # HTTP/1.0 tools; a browser always sends one
    assert not policy.allows(["127.0.0.1", "127.0.0.1"])


def test_host_name_keeps_brackets_and_drops_the_port() -> None:
    assert host_name("[::1]:6001") == "[::1]"
    assert host_name("Example.COM.:80") == "example.com"
    assert host_name("a:b") is None


@settings(max_examples=300, deadline=None)
@given(label=st.from_regex(r"[a-z][a-z0-9-]{0,20}\.[a-z]{2,6}", fullmatch=True))
def test_no_dns_name_passes_unless_listed(label: str) -> None:
    assert not HostPolicy("127.0.0.1").allows([label])
    assert HostPolicy("127.0.0.1", [label]).allows([label.upper() + ":1234"])
