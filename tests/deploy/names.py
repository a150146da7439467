"""Metric names in PromQL text, and the names a real ``/metrics`` scrape offers."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["NOT_BASTION", "metric_names", "scrape_names"]

#: A Bastion metric name (recording rules are ``bastion:...`` and do not match).
_NAME = re.compile(r"\bbastion_[a-z0-9_]+\b")

#: Names the expressions use that Prometheus itself provides.
NOT_BASTION = frozenset({"up"})

#: The sample names each family type exposes.
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
}


def metric_names(expr: str) -> set[str]:
    """Every ``bastion_*`` metric name in a PromQL expression."""
    return set(_NAME.findall(expr))


def scrape_names(text: str) -> set[str]:
    """Every sample name an exposition offers, with or without samples yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names
