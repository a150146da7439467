"""Origin allow-lists: pattern parsing and matching (bastion.security.origins)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.security.origins import OriginPolicy, parse_origin, parse_patterns

LIST = ["https://app.example.com", "https://*.example.com"]


def policy(*entries: str, reject_missing: bool = False) -> OriginPolicy:
    return OriginPolicy.build(list(entries), reject_missing)


# --- no list -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin", [None, "", "null", "https://evil.net", "not an origin", "https://a.com/path"]
)
def test_unset_list_allows_everything(origin: str | None) -> None:
    unset = OriginPolicy.build(None, reject_missing=True)
    assert not unset.restricted
    assert unset.allows(origin)
    assert origin is None or not unset.allows_cors(origin)


# --- exact entries ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com",
        "HTTPS://APP.EXAMPLE.COM",
        "https://App.Example.Com",
        "https://app.example.com:443",
    ],
)
def test_exact_matches_modulo_case_and_default_port(origin: str) -> None:
    assert policy("https://app.example.com").allows(origin)


@pytest.mark.parametrize(
    "origin",
    [
        "http://app.example.com",
        "https://app.example.com:8443",
        "https://app.example.com:80",
        "https://example.com",
        "https://other.example.com",
        "https://app.example.com.evil.net",
        "https://evil-app.example.com",
        "wss://app.example.com",
    ],
)
def test_exact_refuses_everything_else(origin: str) -> None:
    assert not policy("https://app.example.com").allows(origin)


def test_default_ports_normalise_both_ways() -> None:
    assert policy("http://a.com:80").allows("http://a.com")
    assert policy("http://a.com").allows("http://a.com:80")
    assert policy("https://a.com:443").allows("https://a.com")
    assert not policy("http://a.com").allows("http://a.com:443")


def test_explicit_ports_must_match() -> None:
    allowed = policy("http://localhost:3000")
    assert allowed.allows("http://localhost:3000")
    assert not allowed.allows("http://localhost:3001")
    assert not allowed.allows("http://localhost")


def test_ipv6_and_ip_literals() -> None:
    assert policy("http://[::1]:8080").allows("http://[::1]:8080")
    assert policy("http://127.0.0.1:8080").allows("http://127.0.0.1:8080")
    assert not policy("http://127.0.0.1:8080").allows("http://127.0.0.2:8080")


# --- wildcard entries ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    ["https://a.example.com", "https://a.b.example.com", "https://A.EXAMPLE.com:443"],
)
def test_wildcard_matches_subdomains(origin: str) -> None:
    assert policy("https://*.example.com").allows(origin)


@pytest.mark.parametrize(
    "origin",
    [
        "https://example.com",
        "https://evil-example.com",
        "https://example.com.evil.net",
        "https://a.example.com.evil.net",
        "https://aexample.com",
        "http://a.example.com",
        "wss://a.example.com",
        "https://a.example.com:8443",
        "https://.example.com",
        "https://a..example.com",
    ],
)
def test_wildcard_refuses_look_alikes(origin: str) -> None:
    assert not policy("https://*.example.com").allows(origin)


def test_wildcard_honours_its_port() -> None:
    allowed = policy("https://*.example.com:8443")
    assert allowed.allows("https://a.example.com:8443")
    assert not allowed.allows("https://a.example.com")
    assert not allowed.allows("https://a.example.com:443")


# --- star, missing, null, malformed -------------------------------------------------------


def test_star_allows_everything() -> None:
    star = policy("*")
    for origin in ("https://anything.net", "null", "http://x:1", "garbage"):
        assert star.allows(origin)
    assert star.allows_cors("https://anything.net")
    # CORS never echoes an origin that is not one.
    assert not star.allows_cors("null")


def test_missing_origin_allowed_unless_opted_out() -> None:
    assert policy(*LIST).allows(None)
    assert not policy(*LIST, reject_missing=True).allows(None)
    assert not policy("*", reject_missing=True).allows(None)


def test_empty_list_refuses_every_origin_but_not_missing() -> None:
    empty = OriginPolicy.build([], False)
    assert empty.restricted
    assert not empty.allows("https://app.example.com")
    assert empty.allows(None)


@pytest.mark.parametrize(
    "origin",
    [
        "null",
        "",
        " ",
        "app.example.com",
        "//app.example.com",
        "https://app.example.com/",
        "https://app.example.com/path",
        "https://app.example.com?x=1",
        "https://app.example.com#f",
        "https://user@app.example.com",
        "https://user:pw@app.example.com",
        " https://app.example.com",
        "https://app.example.com ",
        "https://app.example.com\t",
        "https://app .example.com",
        "https://app.example.com:",
        "https://app.example.com:0",
        "https://app.example.com:65536",
        "https://app.example.com:99999",
        "https://*.example.com",
        "https://app.example.com.",
        "https://app.exämple.com",
        "https://app.example.\u212aom",  # Kelvin sign folds to "k" under Unicode rules
        "https://app.example.com\r\nX: y",
    ],
)
def test_malformed_origins_are_refused(origin: str) -> None:
    assert parse_origin(origin) is None
    assert not policy(*LIST).allows(origin)
    assert not policy(*LIST).allows_cors(origin)


# --- pattern validation -------------------------------------------------------------------


def test_parse_patterns_accepts_valid_entries() -> None:
    parsed = parse_patterns(
        ["https://a.com", "http://localhost:3000", "https://*.example.com:8443", "*"]
    )
    assert parsed[3] is None
    wildcard = parsed[2]
    assert wildcard is not None
    assert (wildcard.scheme, wildcard.host, wildcard.port, wildcard.wildcard) == (
        "https",
        "example.com",
        8443,
        True,
    )


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "null",
        "example.com",
        "https://example.com/",
        "https://example.com/app",
        "https://user@example.com",
        "https://example.com:0",
        "https://example.com:70000",
        " https://example.com",
        "https://*",
        "https://*.*.example.com",
        "https://a*.example.com",
        "https://*example.com",
        "*.example.com",
        "https://*.0.0.1",
        "**",
    ],
)
def test_parse_patterns_names_the_bad_entry(entry: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(entry))):
        parse_patterns(["https://fine.example.com", entry])
    with pytest.raises(ValueError):
        OriginPolicy.build([entry], False)


def test_parse_patterns_refuses_non_strings() -> None:
    with pytest.raises(ValueError, match="42"):
        parse_patterns(["https://a.com", 42])  # type: ignore[list-item]


def test_policy_is_frozen() -> None:
    built = policy(*LIST)
    with pytest.raises(AttributeError):
        built.restricted = False  # type: ignore[misc]


# --- properties ---------------------------------------------------------------------------

label = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domain = (
    st.lists(label, min_size=1, max_size=3)
    .map(".".join)
    .filter(lambda d: not d.rsplit(".", 1)[-1].isdigit())
)
host = st.lists(label, min_size=1, max_size=4).map(".".join)
scheme = st.sampled_from(["http", "https"])


@given(scheme=scheme, domain=domain, labels=st.lists(label, min_size=1, max_size=3))
def test_wildcard_matches_any_subdomain(scheme: str, domain: str, labels: list[str]) -> None:
    sub = ".".join(labels)
    allowed = policy(f"{scheme}://*.{domain}")
    assert allowed.allows(f"{scheme}://{sub}.{domain}")
    assert allowed.allows(f"{scheme.upper()}://{sub.upper()}.{domain.upper()}")
    assert not allowed.allows(f"{scheme}://{domain}")


@given(scheme=scheme, domain=domain, candidate=host)
def test_wildcard_never_matches_outside_its_domain(
    scheme: str, domain: str, candidate: str
) -> None:
    allowed = policy(f"{scheme}://*.{domain}")
    matched = allowed.allows(f"{scheme}://{candidate}")
    assert matched == candidate.endswith("." + domain)


@given(scheme=scheme, entry=host, candidate=host, port=st.none() | st.integers(1, 65535))
def test_exact_matches_only_itself(
    scheme: str, entry: str, candidate: str, port: int | None
) -> None:
    default = 443 if scheme == "https" else 80
    suffix = "" if port is None else f":{port}"
    allowed = policy(f"{scheme}://{entry}{suffix}")
    same_port = (port or default) == default
    assert allowed.allows(f"{scheme}://{entry.upper()}{suffix}")
    assert allowed.allows(f"{scheme}://{entry}:{port or default}")
    assert allowed.allows(f"{scheme}://{entry}") == same_port
    assert allowed.allows(f"{scheme}://{candidate}{suffix}") == (candidate == entry)
    other = "https" if scheme == "http" else "http"
    assert not allowed.allows(f"{other}://{entry}{suffix}")
