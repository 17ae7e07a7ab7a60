"""Bulk encoding end to end: `tastemaker encode` as a real Ray Data job on the session's Ray (two
encoder actors), then `tastemaker load items --vectors` through the real gRPC API into the real
Serve application, whose gateway must use the supplied vectors instead of encoding, and must refuse
vectors of the wrong dimension or of another model."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest

from tastemaker.cli import main as cli_main
from tastemaker.datasets.movielens import load_movielens
from tastemaker.encoder.base import create_backend
from tastemaker.encoder.bulk import read_vectors, run_bulk_encode
from tastemaker.encoder.identity import model_identity
from tastemaker.gateway.convert import domain_item
from tastemaker.v1 import recommender_service_pb2 as pb
from tests.integration.conftest import make_config, start

pytestmark = pytest.mark.integration

N_ITEMS = 40
#: Appended to every description, so no other catalog text is identical to a test item's.
MARK = "Loaded by the bulk-encoding test."


@pytest.fixture(scope="module")
def service(ray_session, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("bulk-data"))
    # Two actors, half a CPU each, small batches: the catalog is really split across the pool,
    # and the job fits next to the service in the session's 4 logical CPUs.
    config.bulk_encode = config.bulk_encode.model_copy(
        update={"concurrency": 2, "num_cpus": 0.5, "batch_size": 8, "read_blocks": 4}
    )
    running = start(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def records():
    out = []
    for item in load_movielens().items[:N_ITEMS]:
        out.append(
            {
                "item_id": f"bulk-{item.item_id}",
                "title": item.title,
                "description": f"{item.description} {MARK}",
                "tags": item.tags,
                "attributes": item.attributes,
            }
        )
    return out


@pytest.fixture(scope="module")
def items_file(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("bulk-items") / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def vectors_dir(service, items_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bulk-out") / "vectors"
    result = run_bulk_encode(items_file, out, service.config, show_progress=False)
    assert result.out_dir == out
    return out


def _texts(records) -> list[str]:
    from tastemaker.demo import item_from_record

    return [domain_item(item_from_record(r, "t")).text() for r in records]


def _encoder_texts(service) -> int:
    from ray import serve

    handle = serve.get_deployment_handle("Encoder", app_name=service.config.server.app_name)
    return handle.stats.remote().result()["texts"]


def _similar_when_visible(client, item_id: str, page_size: int = 3, timeout_s: float = 60.0):
    """SimilarItems once the retrieval replica has followed the change feed to `item_id`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.similar_items(item_id, page_size=page_size).items
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_ray_data_job_vectors_equal_the_backend_on_item_text(service, records, vectors_dir):
    vectors = read_vectors(vectors_dir)
    manifest = vectors.manifest
    assert (manifest["count"], manifest["unique_items"], manifest["dimension"]) == (N_ITEMS, N_ITEMS, 384)
    assert manifest["model_identity"] == model_identity(service.config.encoder)
    assert manifest["job"]["concurrency"] == 2
    backend = create_backend(service.config.encoder)
    backend.start()
    direct = backend.encode(_texts(records))
    for record, text, expected in zip(records, _texts(records), direct):
        got = vectors.get(record["item_id"], text)
        assert got is not None, record["item_id"]
        assert got.dtype == np.float32 and abs(float(np.linalg.norm(got)) - 1.0) < 1e-5
        assert float(got @ expected) >= 0.999, record["item_id"]


def test_load_with_vectors_skips_encoding_and_behaves_like_an_encoded_load(
    service, records, items_file, vectors_dir, capsys, monkeypatch
):
    client = service.client
    before = _encoder_texts(service)
    monkeypatch.setenv("TASTEMAKER_API_KEY", service.api_key)  # the key the CLI sends
    assert cli_main(["load", "items", str(items_file), "--vectors", str(vectors_dir), "--target", service.target, "--timeout", "120"]) == 0
    assert f"{N_ITEMS} items carry precomputed vectors" in capsys.readouterr().out
    assert _encoder_texts(service) == before  # the service encoded none of them

    # The same texts under other ids, encoded by the service the ordinary way.
    twins = [pb.Item(**{**r, "item_id": r["item_id"].replace("bulk-", "twin-")}) for r in records]
    assert client.upsert_items(twins) == N_ITEMS
    assert _encoder_texts(service) == before + N_ITEMS  # ...and this counter does move
    _similar_when_visible(client, twins[-1].item_id)  # the change feed is applied in order: all are in

    for record in records[::4]:
        item_id = record["item_id"]
        got = client.get_item(item_id)
        twin = client.get_item(item_id.replace("bulk-", "twin-"))
        assert (got.title, got.description, list(got.tags), dict(got.attributes)) == (
            twin.title, twin.description, list(twin.tags), dict(twin.attributes)
        )
        assert not got.vector  # write-only
        similar = _similar_when_visible(client, item_id)
        # Nearest neighbour by text: the same text encoded by the service, at cosine ~1.
        assert similar[0].item_id == item_id.replace("bulk-", "twin-"), [s.item_id for s in similar]
        assert similar[0].score >= 0.999
        # And the other way round: the vector-loaded item is the encoded one's nearest neighbour.
        assert _similar_when_visible(client, twin.item_id)[0].item_id == item_id


def test_supplied_vector_is_used_instead_of_the_text(service, records, vectors_dir):
    """An item whose vector is another item's: its neighbours follow the vector, not its text."""
    vectors = read_vectors(vectors_dir)
    texts = _texts(records)
    donor = vectors.get(records[1]["item_id"], texts[1])  # Jumanji's vector
    item = pb.Item(item_id="swapped", title=records[0]["title"], description=records[0]["description"], vector=donor.tolist())
    service.client.upsert_items([item], vector_model=vectors.model_identity)
    similar = _similar_when_visible(service.client, "swapped")
    assert similar[0].item_id in {records[1]["item_id"], records[1]["item_id"].replace("bulk-", "twin-")}
    assert similar[0].score >= 0.999


def test_bad_vectors_are_refused_with_the_right_status(service, records, vectors_dir):
    vectors = read_vectors(vectors_dir)
    stub = service.client.stub

    def upsert(vector, vector_model):
        request = pb.UpsertItemsRequest(
            items=[pb.Item(item_id="bad-vector", title="Heat (1995)", vector=vector)], vector_model=vector_model
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.UpsertItems(request, timeout=60)
        return info.value.code(), info.value.details()

    good = vectors.vectors[0].tolist()
    code, details = upsert(good[:100], vectors.model_identity)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "dimension is 384" in details
    code, details = upsert(good, "some-other-model:mean:256:sha256=0123456789abcdef")
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "some-other-model" in details
    code, details = upsert([float("nan")] + good[1:], vectors.model_identity)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in details
    code, details = upsert(good, "")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "vector_model" in details
    with pytest.raises(grpc.RpcError) as info:
        service.client.get_item("bad-vector")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was written
