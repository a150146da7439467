"""One node alone: the ``local`` cluster (``[adapter] driver = "local"``).

A node that shares nothing is an in-memory cluster of one
(:class:`~bastion.adapters.memory.MemoryCluster`): the same decisions (occupied,
vacated, member added and removed, online and offline, throttled counts) taken
by the same code as in the tests' multi-node clusters, with no peer to queue
anything for, and every read answered without suspending.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bastion.adapters.base import Cluster
from bastion.adapters.memory import MemoryCluster

__all__ = ["local_cluster"]


def local_cluster(clock: Callable[[], float] = time.monotonic) -> Cluster:
    """The bus, state and replay claims of a node that is its own cluster.

    Args:
        clock: monotonic seconds (the hub's clock: count throttle, cache TTLs).
    """
    return MemoryCluster(clock).join("local")
