"""Store split detection (`tastemaker.cluster`): pure comparison of the store instance ids the
components report, and the messages an operator sees."""

from __future__ import annotations

import logging

from tastemaker.cluster import SplitMonitor, describe_split, refuse_sqlite_on_cluster, shard_reports, sqlite_refusal

SAME = {
    "gateway/a": ("id-1", "node-aaaaaaaaaa"),
    "retrieval/b": ("id-1", "node-bbbbbbbbbb"),
    "shard/0": ("id-1", "node-aaaaaaaaaa"),
}


def test_one_store_is_no_split():
    assert describe_split(SAME) is None
    assert describe_split({}) is None


def test_a_split_names_each_component_and_node_but_no_url():
    reports = {**SAME, "retrieval/c": ("id-2", "node-cccccccccc")}
    message = describe_split(reports)
    assert message is not None
    assert "2 different stores" in message
    assert "retrieval/c (node node-ccc)" in message and "store id-2" in message
    assert "gateway/a" in message and "PostgreSQL" in message
    assert "sqlite" not in message.lower() and "://" not in message


def test_monitor_needs_every_kind_and_logs_a_split_once(caplog):
    monitor = SplitMonitor()
    assert monitor.check({"gateway/a": ("id-1", "n")}) is False  # no retrieval or shard report yet
    assert monitor.check(SAME) is True
    split = {**SAME, "shard/1": ("id-2", "node-x")}
    with caplog.at_level(logging.ERROR, logger="tastemaker.cluster"):
        assert monitor.check(split) is False
        assert monitor.check(split) is False
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "shard/1" in errors[0].getMessage()
    assert monitor.check(SAME) is True


def test_shard_reports_come_from_ready_answers():
    states = [{"users": 1, "store_instance_id": "id-1", "node_id": "n1"}, {"store_instance_id": "id-2", "node_id": "n2"}]
    assert shard_reports(states) == {"shard/0": ("id-1", "n1"), "shard/1": ("id-2", "n2")}


def test_sqlite_is_refused_on_more_than_one_node_and_postgres_is_not():
    """(Through `serve deploy` on a real two-node cluster: tests/integration/test_multinode.py.)"""
    assert sqlite_refusal("sqlite:////tmp/x.db", 1) is None
    message = sqlite_refusal("sqlite:////tmp/x.db", 2)
    assert message is not None
    assert "2 nodes" in message and "PostgreSQL" in message and "TASTEMAKER_STORE_URL" in message
    assert "/tmp/x.db" not in message
    assert sqlite_refusal("postgresql://u:secret@db:5432/t", 5) is None


def test_refusal_is_a_no_op_without_ray():
    refuse_sqlite_on_cluster("sqlite:////tmp/x.db")  # not connected to a cluster: nothing to count
