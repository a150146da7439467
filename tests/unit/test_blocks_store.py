"""The blocks file: round trip, change polling, unblock as a change, expiry, pruning."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from bastion.security.reputation import Block
from bastion.store.blocks import KEEP_SECONDS, BlockStore, BlockStoreError, list_active

T0 = 1_700_000_000.0


def manual(ip: str, until: float, reason: str = "operator") -> Block:
    return Block(ip=ip, until=until, reason=reason, source="manual", created=T0)


def auto(ip: str, until: float) -> Block:
    return Block(ip=ip, until=until, reason="reputation", source="auto", created=T0)


@pytest.fixture
def store(tmp_path: Path) -> BlockStore:
    return BlockStore(tmp_path / "blocks.sqlite3")


def test_round_trip_and_wal(store: BlockStore, tmp_path: Path) -> None:
    assert store.last_change_id() == 0
    assert store.active(now=T0) == []
    block = manual("192.0.2.1", T0 + 3600, "abuse report #12")
    assert store.block(block, now=T0)
    assert store.active(now=T0) == [block]
    assert store.get("192.0.2.1", now=T0) == block
    assert store.get("192.0.2.2", now=T0) is None
    store.close()
    with BlockStore(tmp_path / "blocks.sqlite3") as again:
        assert again.active(now=T0) == [block]
    connection = sqlite3.connect(tmp_path / "blocks.sqlite3")
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    connection.close()


def test_changes_since_an_id(store: BlockStore) -> None:
    store.block(manual("192.0.2.1", T0 + 60), now=T0)
    store.block(manual("192.0.2.2", T0 + 60), now=T0)
    first = store.changes(0)
    assert [(c.change_id, c.ip) for c in first] == [(1, "192.0.2.1"), (2, "192.0.2.2")]
    last = first[-1].change_id
    assert store.changes(last) == []  # nothing new: one cheap indexed query
    previous = store.unblock("192.0.2.1", now=T0 + 1)
    assert previous is not None and previous.reason == "operator"
    [change] = store.changes(last)
    assert (change.change_id, change.ip, change.block) == (3, "192.0.2.1", None)
    assert store.active(now=T0 + 1) == [manual("192.0.2.2", T0 + 60)]
    # An address changed twice appears once, with its latest state.
    store.block(manual("192.0.2.1", T0 + 120, "again"), now=T0 + 2)
    [again] = store.changes(last)
    assert again.block is not None and again.block.reason == "again"
    assert store.last_change_id() == 4
    assert [c.ip for c in store.changes(0, limit=1)] == ["192.0.2.2"]


def test_unblock_of_an_unknown_address_writes_nothing(store: BlockStore) -> None:
    assert store.unblock("192.0.2.1", now=T0) is None
    assert store.last_change_id() == 0


def test_expired_blocks_are_not_active(store: BlockStore) -> None:
    store.block(manual("192.0.2.1", T0 + 10), now=T0)
    assert store.active(now=T0 + 9.999) != []
    assert store.active(now=T0 + 10) == []
    assert store.get("192.0.2.1", now=T0 + 10) is None
    assert store.unblock("192.0.2.1", now=T0 + 11) is None  # nothing was in force


def test_auto_never_shortens_manual_replaces(store: BlockStore) -> None:
    store.block(manual("192.0.2.1", T0 + 3600), now=T0)
    assert not store.block(auto("192.0.2.1", T0 + 60), now=T0)
    assert store.get("192.0.2.1", now=T0) == manual("192.0.2.1", T0 + 3600)
    assert store.last_change_id() == 1  # a refused replacement is no change
    assert store.block(auto("192.0.2.1", T0 + 7200), now=T0)
    assert store.block(manual("192.0.2.1", T0 + 5), now=T0)
    assert store.get("192.0.2.1", now=T0) == manual("192.0.2.1", T0 + 5)
    # Once expired or unblocked, an automatic block applies again.
    assert store.block(auto("192.0.2.1", T0 + 60), now=T0 + 6)


def test_prune_keeps_recent_changes(store: BlockStore) -> None:
    store.block(manual("192.0.2.1", T0 + 10), now=T0)
    store.block(manual("192.0.2.2", T0 + 10 * KEEP_SECONDS), now=T0)
    store.block(manual("192.0.2.3", T0 + 10 * KEEP_SECONDS), now=T0)
    store.unblock("192.0.2.3", now=T0)
    # Inside the keep window, an unblock stays readable by nodes that lag.
    assert store.prune(now=T0 + 100) == 0
    assert store.prune(now=T0 + KEEP_SECONDS + 100) == 2
    assert [c.ip for c in store.changes(0)] == ["192.0.2.2"]
    # Change ids never go back, even after the newest row was pruned.
    store.block(manual("192.0.2.4", T0 + 10 * KEEP_SECONDS), now=T0)
    assert store.last_change_id() == 5


def test_list_active_is_read_only(tmp_path: Path) -> None:
    path = tmp_path / "blocks.sqlite3"
    assert list_active(path, now=T0) == []
    assert not path.exists()  # reading never creates the file
    with BlockStore(path) as store:
        store.block(manual("192.0.2.2", T0 + 20), now=T0)
        store.block(manual("192.0.2.1", T0 + 10), now=T0)
    assert [b.ip for b in list_active(path, now=T0)] == ["192.0.2.1", "192.0.2.2"]
    assert [b.ip for b in list_active(path, now=T0 + 15)] == ["192.0.2.2"]
    path.with_name("junk.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(BlockStoreError, match="junk"):
        list_active(path.with_name("junk.sqlite3"), now=T0)


def test_bad_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(BlockStoreError, match="missing-dir"):
        BlockStore(tmp_path / "missing-dir" / "blocks.sqlite3")
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(BlockStoreError, match="junk"):
        BlockStore(junk)


def test_closed_store_raises_store_error(store: BlockStore) -> None:
    store.close()
    with pytest.raises(BlockStoreError):
        store.active(now=T0)
    with pytest.raises(BlockStoreError):
        store.block(manual("192.0.2.1", T0 + 1), now=T0)


def test_two_writers_get_distinct_increasing_change_ids(tmp_path: Path) -> None:
    path = tmp_path / "blocks.sqlite3"
    stores = [BlockStore(path), BlockStore(path)]  # a node and the CLI

    def write(store: BlockStore, base: int) -> None:
        for i in range(25):
            store.block(manual(f"192.0.2.{base + i}", T0 + 60), now=T0)

    threads = [threading.Thread(target=write, args=(s, 100 * n)) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    ids = [change.change_id for change in stores[0].changes(0)]
    assert ids == list(range(1, 51))
    for store in stores:
        store.close()
