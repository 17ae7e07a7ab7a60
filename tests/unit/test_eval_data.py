"""Loading evaluation data from the user's own files (`tastemaker.evaluation.data`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tastemaker.domain import EventType
from tastemaker.errors import InvalidArgument
from tastemaker.evaluation.data import load_interactions, subsample_interactions

ITEMS_CSV = """item_id,title,description,tags
a,Alpha,An alpha film,space|robots
b,Beta,,comedy
c,Gamma,A gamma film,
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _by_id(data):
    return {it.item_id: i for i, it in enumerate(data.items)}


def test_csv_interactions_with_ratings_iso_times_and_an_items_file(tmp_path):
    items = _write(tmp_path, "items.csv", ITEMS_CSV)
    events = _write(
        tmp_path,
        "events.csv",
        "user_id,item_id,timestamp,rating\n"
        "u1,a,2024-01-01T00:00:10Z,5\n"
        "u1,b,5,2.5\n"
        "u2,c,2024-01-01T00:00:00,\n"  # no zone = UTC; no rating = a click
        "u2,zzz,7,4\n",  # unknown item: dropped and counted
    )
    data = load_interactions(str(events), items_path=str(items))
    assert data.n_items == 3 and data.n_users == 2 and data.n_events == 3
    assert data.stats["dropped_unknown_item_events"] == 1
    ids = _by_id(data)
    alpha = data.items[ids["a"]]
    assert alpha.tags == ["space", "robots"] and alpha.text() == "Alpha. An alpha film. Tags: space, robots"
    order = [data.items[i].item_id for i in data.item]
    assert order == ["b", "c", "a"]  # by time: 5 s, 2024-01-01T00:00:00Z, ...:10Z
    assert data.time[1] == pytest.approx(1704067200.0)
    c = order.index("c")
    assert data.event_type[c] == EventType.CLICK and np.isnan(data.rating[c])
    assert data.event_type[order.index("a")] == EventType.RATING and data.rating[order.index("a")] == 5.0


def test_event_type_column_and_bad_rows_give_messages_a_person_can_act_on(tmp_path):
    items = _write(tmp_path, "items.csv", ITEMS_CSV)
    ok = _write(tmp_path, "ok.csv", "user_id,item_id,timestamp,event_type\nu,a,1,purchase\nu,b,2,skip\n")
    data = load_interactions(str(ok), items_path=str(items))
    assert sorted(data.event_type.tolist()) == sorted([EventType.PURCHASE, EventType.SKIP])
    cases = {
        "user_id,item_id\nu,a\n": "missing columns \\['timestamp'\\]",
        "user_id,item_id,timestamp,event_type\nu,a,1,teleport\n": "unknown event_type 'teleport'",
        "user_id,item_id,timestamp\nu,a,yesterday\n": "neither Unix seconds nor ISO 8601",
        "user_id,item_id,timestamp,event_type,rating\nu,a,1,rating,9\n": "rating in \\[0.5, 5\\]",
    }
    for n, (text, message) in enumerate(cases.items()):
        bad = _write(tmp_path, f"bad{n}.csv", text)
        with pytest.raises(InvalidArgument, match=message):
            load_interactions(str(bad), items_path=str(items))
    with pytest.raises(InvalidArgument, match="needs --items"):
        load_interactions(str(ok))
    with pytest.raises(InvalidArgument, match="neither 'movielens' nor an existing file"):
        load_interactions(str(tmp_path / "nope.csv"), items_path=str(items))


def test_parquet_interactions_and_jsonl_items(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    items = tmp_path / "items.jsonl"
    items.write_text(
        "\n".join(json.dumps(r) for r in [{"item_id": "x", "title": "X", "tags": ["t1"]}, {"item_id": "y", "title": "Y"}])
    )
    table = pa.table({"user_id": ["1", "1", "2"], "item_id": ["x", "y", "y"], "timestamp": [3.0, 1.0, 2.0], "rating": [4.0, 3.0, None]})
    pq.write_table(table, tmp_path / "events.parquet")
    data = load_interactions(str(tmp_path / "events.parquet"), items_path=str(items))
    assert data.n_events == 3 and data.items[_by_id(data)["x"]].tags == ["t1"]
    assert data.time.tolist() == [1.0, 2.0, 3.0]


def test_subsample_keeps_the_most_interacted_items_then_the_most_active_users(tmp_path):
    items = _write(tmp_path, "items.csv", ITEMS_CSV)
    rows = ["user_id,item_id,timestamp"]
    rows += [f"u{u},a,{u}" for u in range(5)] + [f"u{u},b,{10 + u}" for u in range(3)] + ["u9,c,50"]
    events = _write(tmp_path, "events.csv", "\n".join(rows) + "\n")
    data = load_interactions(str(events), items_path=str(items))
    small = subsample_interactions(data, max_items=2, max_users=2)
    assert sorted(it.item_id for it in small.items) == ["a", "b"]
    assert small.n_users == 2 and set(small.user_ids) <= {"u0", "u1", "u2"}  # users with 2 events
    assert small.user.max() < small.n_users and small.item.max() < small.n_items


def test_movielens_by_name_and_subsampled():
    data = load_interactions("movielens", max_items=50, max_users=20)
    assert data.n_items == 50 and data.n_users == 20 and data.name == "movielens"
    assert np.all(np.diff(data.time) >= 0)
    assert set(data.event_type.tolist()) == {int(EventType.RATING)}
