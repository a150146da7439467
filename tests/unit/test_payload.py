"""Client event rules per app: the name allow-list and a JSON Schema per name."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bastion.config import settings_from_mapping
from bastion.errors import ConfigError
from bastion.security.payload import ClientEventPolicy

POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
    "required": ["x", "y"],
    "additionalProperties": False,
}


def test_no_rules_accepts_everything_and_is_inactive() -> None:
    policy = ClientEventPolicy(None, {})
    assert not policy.active
    assert policy.allows("client-anything")
    assert policy.check_data("client-anything", {"whatever": [1, 2]}) is None


def test_allowlist_takes_exact_names_and_star_prefixes() -> None:
    policy = ClientEventPolicy(["client-typing", "client-cursor-*"], {})
    assert policy.active
    assert policy.allows("client-typing")
    assert policy.allows("client-cursor-move")
    assert policy.allows("client-cursor-")
    assert not policy.allows("client-typing2")
    assert not policy.allows("client-cursor")
    assert not policy.allows("client-other")


def test_empty_allowlist_refuses_every_name() -> None:
    policy = ClientEventPolicy([], {})
    assert policy.active and not policy.allows("client-x")


def test_schema_accepts_matching_data_and_names_keyword_and_location_not_value() -> None:
    policy = ClientEventPolicy(None, {"client-point": POINT})
    assert policy.check_data("client-point", {"x": 1, "y": 2}) is None
    detail = policy.check_data("client-point", {"x": "s3cr3t-value", "y": 2})
    assert detail is not None
    assert "'type' rule failed at $.x" in detail
    assert "s3cr3t-value" not in detail
    missing = policy.check_data("client-point", {"x": 1})
    assert missing is not None and "'required'" in missing and "at $" in missing
    # Events without a schema are not checked.
    assert policy.check_data("client-other", "anything") is None


def test_location_of_array_items_and_odd_keys() -> None:
    schema = {
        "type": "object",
        "additionalProperties": {"type": "array", "items": {"type": "string"}},
    }
    policy = ClientEventPolicy(None, {"client-list": schema})
    detail = policy.check_data("client-list", {"tags": ["a", 3]})
    assert detail is not None and detail.endswith("at $.tags[1]")
    odd = policy.check_data("client-list", {"a b<script>": [1]})
    assert odd is not None and "<script>" not in odd and odd.endswith("at $[…][0]")


def test_remote_references_are_never_fetched() -> None:
    policy = ClientEventPolicy(
        None, {"client-ref": {"$ref": "http://127.0.0.1:9/never-fetched.json"}}
    )
    with pytest.raises(Exception) as caught:
        policy.check_data("client-ref", {})
    # An unresolvable reference, not a network attempt (port 9 would refuse it anyway).
    assert "Unresolvable" in type(caught.value).__name__ or "resolv" in str(caught.value).lower()


def test_invalid_schema_is_refused_naming_the_event() -> None:
    with pytest.raises(ValueError, match="client-bad"):
        ClientEventPolicy(None, {"client-bad": {"type": "no-such-type"}})


def _settings(**app: Any) -> Any:
    return settings_from_mapping(
        {"apps": [{"id": "1", "key": "k", "secret": "s", **app}]}, environ={}
    )


def test_config_rejects_a_bad_schema_and_a_non_client_name() -> None:
    with pytest.raises(ConfigError, match=r"apps\.0\.client_event_schemas: .*client-bad"):
        _settings(client_event_schemas={"client-bad": {"minimum": "zero"}})
    with pytest.raises(ConfigError, match=r"apps\.0\.client_event_allowlist: .*client-"):
        _settings(client_event_allowlist=["typing"])
    ok = _settings(client_event_allowlist=["client-a"], client_event_schemas={"client-a": POINT})
    assert ok.apps[0].client_event_schemas["client-a"] == POINT


@given(
    prefix=st.text(alphabet="abc-", max_size=5),
    name=st.text(alphabet="abc-", max_size=8),
)
def test_prefix_pattern_admits_exactly_names_starting_with_it(prefix: str, name: str) -> None:
    policy = ClientEventPolicy([f"client-{prefix}*"], {})
    assert policy.allows(f"client-{name}") == name.startswith(prefix)
