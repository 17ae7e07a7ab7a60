"""Bulk encoding of a whole catalog off-line, as a Ray Data job, and reading its vectors back.

`tastemaker encode ITEMS_FILE --out DIR` runs `run_bulk_encode`: Ray Data reads the items file (the
JSON Lines format of `tastemaker load items`) line by line, a pool of actors (`ItemEncoder`, one
encoder backend each, built from the `encoder` config section by `create_backend`) turns each batch
of lines into vectors, and the result is written as Parquet:

    item_id: string, text_sha256: string, model_identity: string, vector: fixed_size_list<float32>[dim]

plus `manifest.json` (model identity, dimension, count, encoder settings, job settings, timing).
Each line is converted exactly as the gateway converts an upserted item (`item_from_record` then
`convert.item_from_pb`), so the vector is the one the pool would compute for `Item.text()`, and
an item the service would reject fails the job with the same message.

`tastemaker load items ITEMS_FILE --vectors DIR` uses `read_vectors` + `attach_vectors`: a vector is
attached to an item only when its `item_id` and the SHA-256 of its text both match a row, so an item
edited since it was encoded is sent without a vector and encoded by the service. The gateway then
checks the vectors against the running encoder (`convert.check_supplied_vectors`).

The file and the output folder must be readable/writable from every node of the cluster (a local
path with a local Ray; a shared filesystem on a multi-node cluster).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from tastemaker.config import BulkEncodeConfig, EncoderConfig, GatewayConfig, ServiceConfig
from tastemaker.errors import InvalidArgument, TastemakerError

#: What `manifest.json` says it is; `read_vectors` refuses anything else.
MANIFEST_FORMAT = "tastemaker.item_vectors.v1"
MANIFEST_NAME = "manifest.json"
#: How many bad lines a failed job lists.
_ERRORS_SHOWN = 5
#: CPUs each read and write task reserves: they only move bytes, and a full CPU each would not fit
#: next to the encoder actors on a small machine.
IO_NUM_CPUS = 0.25

logger = logging.getLogger(__name__)


def text_digest(text: str) -> str:
    """SHA-256 (hex) of the text the encoder sees: matches a stored vector to an item's text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode_lines(
    lines: Sequence[str], backend, gateway: GatewayConfig, identity: str, where: str = "items file"
) -> "Any":
    """A batch of items-file lines → a pyarrow table of (item_id, text_sha256, model_identity,
    vector, error). A line the service would refuse gets its reason in `error` and no vector, so
    one job reports every bad line instead of stopping at the first."""
    import pyarrow as pa

    from tastemaker.demo import item_from_record, parse_json_object
    from tastemaker.gateway.convert import item_from_pb

    ids: list[str] = []
    digests: list[Optional[str]] = []
    errors: list[Optional[str]] = []
    texts: list[str] = []
    for line in lines:
        try:
            item = item_from_pb(item_from_record(parse_json_object(line, where), where), gateway)
        except TastemakerError as exc:
            ids.append(_id_of(line))
            digests.append(None)
            errors.append(str(exc))
            continue
        text = item.text()
        ids.append(item.item_id)
        digests.append(text_digest(text))
        errors.append(None)
        texts.append(text)
    dimension = backend.dimension
    encoded = backend.encode(texts) if texts else np.zeros((0, dimension), dtype=np.float32)
    vectors = np.zeros((len(ids), dimension), dtype=np.float32)
    ok = np.array([e is None for e in errors], dtype=bool)
    vectors[ok] = encoded
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    vector_column = pa.FixedSizeListArray.from_arrays(flat, dimension, mask=pa.array(~ok))
    return pa.table(
        {
            "item_id": pa.array(ids, type=pa.string()),
            "text_sha256": pa.array(digests, type=pa.string()),
            "model_identity": pa.array([identity] * len(ids), type=pa.string()),
            "vector": vector_column,
            "error": pa.array(errors, type=pa.string()),
        }
    )


def _id_of(line: str) -> str:
    """The item_id of a line, if it can be read at all (for error reports)."""
    try:
        record = json.loads(line)
        return str(record.get("item_id", "")) if isinstance(record, dict) else ""
    except (json.JSONDecodeError, AttributeError):
        return ""


class ItemEncoder:
    """The `map_batches` callable: one started encoder backend per Ray Data actor (the model is
    loaded once per actor, not once per batch)."""

    def __init__(self, encoder: EncoderConfig, gateway: GatewayConfig, where: str):
        from tastemaker.encoder.base import create_backend
        from tastemaker.encoder.identity import model_identity

        self.backend = create_backend(encoder)
        self.backend.start()
        self.identity = model_identity(encoder)
        self.gateway = gateway
        self.where = where

    def __call__(self, batch):
        return encode_lines(batch.column("text").to_pylist(), self.backend, self.gateway, self.identity, self.where)


@dataclass
class BulkEncodeResult:
    """What `run_bulk_encode` wrote (`manifest` is also in DIR/manifest.json)."""

    out_dir: Path
    manifest: dict[str, Any]


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidArgument(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise InvalidArgument(f"--out {out_dir} is not empty; choose a new folder or pass --overwrite")
        ours = [p for p in out_dir.iterdir() if p.suffix == ".parquet" or p.name == MANIFEST_NAME]
        others = [p.name for p in out_dir.iterdir() if p not in ours]
        if others:
            raise InvalidArgument(
                f"--out {out_dir} holds files that are not vectors ({', '.join(sorted(others)[:3])}...); "
                "--overwrite only replaces a previous `tastemaker encode` output"
            )
        for path in ours:
            path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _compute(options: BulkEncodeConfig):
    from ray.data import ActorPoolStrategy

    if options.max_concurrency is not None and options.max_concurrency > options.concurrency:
        return ActorPoolStrategy(min_size=options.concurrency, max_size=options.max_concurrency)
    return ActorPoolStrategy(size=options.concurrency)


def check_resources(options: BulkEncodeConfig, available: dict[str, float], local: bool) -> None:
    """The actor pool plus one read/write task must fit into what Ray has free, or Ray Data waits
    forever for resources that never come. On a local Ray that is an error naming the knobs; on a
    cluster (which may autoscale) a warning."""
    need_cpus = options.concurrency * options.num_cpus + IO_NUM_CPUS
    need_gpus = options.concurrency * options.num_gpus
    free_cpus, free_gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
    problems = []
    if need_cpus > free_cpus + 1e-9:
        problems.append(
            f"{options.concurrency} actor(s) x {options.num_cpus:g} CPU + {IO_NUM_CPUS:g} for reading/writing = "
            f"{need_cpus:g} CPUs, but Ray has {free_cpus:g} free"
        )
    if need_gpus > free_gpus + 1e-9:
        problems.append(f"{options.concurrency} actor(s) x {options.num_gpus:g} GPU = {need_gpus:g} GPUs, but Ray has {free_gpus:g} free")
    if not problems:
        return
    message = "bulk_encode does not fit: " + "; ".join(problems) + " (lower --concurrency, --num-cpus or --num-gpus)"
    if local:
        raise InvalidArgument(message)
    logger.warning("%s; waiting for the cluster to provide them", message)


def run_bulk_encode(
    items_path: str | Path,
    out_dir: str | Path,
    config: ServiceConfig,
    overwrite: bool = False,
    show_progress: bool = True,
) -> BulkEncodeResult:
    """Encode every item of `items_path` as a Ray Data job and write Parquet + manifest to `out_dir`.

    Joins the Ray cluster at `config.server.ray_address`, or starts a local Ray (with
    `config.server.ray_num_cpus` CPUs) and stops it again at the end; an already connected Ray
    (e.g. the test session's) is used as it is. Progress is Ray Data's own (a bar per operator on
    a terminal, periodic log lines otherwise). Raises InvalidArgument when lines are not valid
    items (listing the first few; nothing is kept), and TastemakerError for a bad folder."""
    import pyarrow.parquet as pq
    import ray

    items_path = Path(items_path).expanduser().resolve()
    out_dir = Path(out_dir).expanduser().resolve()
    if not items_path.is_file():
        raise InvalidArgument(f"items file {items_path} does not exist")
    _prepare_out_dir(out_dir, overwrite)
    options = config.bulk_encode
    started_ray = False
    if not ray.is_initialized():
        address = config.server.ray_address
        ray.init(
            address=address,
            num_cpus=config.server.ray_num_cpus if address is None else None,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
        started_ray = True
    try:
        check_resources(options, ray.available_resources(), local=config.server.ray_address is None)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = show_progress
        start = time.perf_counter()
        dataset = ray.data.read_text(str(items_path), override_num_blocks=options.read_blocks, num_cpus=IO_NUM_CPUS)
        dataset = dataset.map_batches(
            ItemEncoder,
            fn_constructor_kwargs={"encoder": config.encoder, "gateway": config.gateway, "where": str(items_path)},
            batch_size=options.batch_size,
            batch_format="pyarrow",
            compute=_compute(options),
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus,
        )
        dataset.write_parquet(str(out_dir), ray_remote_args={"num_cpus": IO_NUM_CPUS})
        seconds = time.perf_counter() - start
        cluster_cpus = ray.cluster_resources().get("CPU", 0)
    finally:
        if started_ray:
            ray.shutdown()

    files = sorted(p for p in out_dir.iterdir() if p.suffix == ".parquet")
    meta = pq.read_table(files, columns=["item_id", "model_identity", "error"]) if files else None
    count = meta.num_rows if meta is not None else 0
    if count == 0:
        for path in files:
            path.unlink()
        raise InvalidArgument(f"items file {items_path} has no items")
    errors = [(i, e) for i, e in zip(meta.column("item_id").to_pylist(), meta.column("error").to_pylist()) if e]
    if errors:
        for path in files:
            path.unlink()
        shown = "; ".join(e for _, e in errors[:_ERRORS_SHOWN])
        raise InvalidArgument(f"{len(errors)} of {count} lines of {items_path} are not valid items (nothing written): {shown}")
    identities = sorted(set(meta.column("model_identity").to_pylist()))
    if len(identities) != 1:
        raise TastemakerError(
            f"the job's actors encoded with different model files ({identities}): every node must "
            "have the same encoder.model_path contents"
        )
    dimension = pq.read_schema(files[0]).field("vector").type.list_size
    encoder = config.encoder
    manifest = {
        "format": MANIFEST_FORMAT,
        "model_identity": identities[0],
        "dimension": dimension,
        "count": count,
        "unique_items": len(set(meta.column("item_id").to_pylist())),
        "files": [p.name for p in files],
        "items_file": str(items_path),
        "created_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "encoder": {
            "backend": encoder.backend,
            "model_path": encoder.model_path,
            "pooling": encoder.pooling,
            "max_length": encoder.max_length,
            "device": encoder.device,
            "dtype": encoder.resolved_dtype(),
            "onnx_precision": encoder.onnx_precision if encoder.backend == "onnx" else None,
        },
        "job": {**options.model_dump(), "ray_address": config.server.ray_address, "cluster_cpus": cluster_cpus},
        "seconds": round(seconds, 3),
        "texts_per_s": round(count / seconds, 1) if seconds > 0 else None,
    }
    tmp = out_dir / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST_NAME)  # the manifest appears only once everything is written
    return BulkEncodeResult(out_dir=out_dir, manifest=manifest)


# -- reading the vectors back -----------------------------------------------------------------------
@dataclass
class ItemVectors:
    """Vectors written by `tastemaker encode`, looked up by (item_id, text_sha256)."""

    manifest: dict[str, Any]
    model_identity: str
    dimension: int
    vectors: np.ndarray  # (count, dimension) float32
    index: dict[tuple[str, str], int]

    def get(self, item_id: str, text: str) -> Optional[np.ndarray]:
        """The vector of this item with this text, or None (absent, or the text changed since)."""
        row = self.index.get((item_id, text_digest(text)))
        return None if row is None else self.vectors[row]


def read_vectors(out_dir: str | Path) -> ItemVectors:
    """Load the output of `tastemaker encode` (the manifest is checked first: a folder without
    one is not a finished job)."""
    import pyarrow.parquet as pq

    out_dir = Path(out_dir).expanduser()
    manifest_path = out_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise InvalidArgument(
            f"{out_dir} has no {MANIFEST_NAME}: give the --out folder of a finished `tastemaker encode`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{manifest_path} is not valid JSON ({exc.msg})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise InvalidArgument(f"{manifest_path}: format {manifest.get('format')!r} is not {MANIFEST_FORMAT!r}")
    files = [out_dir / name for name in manifest["files"]]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise InvalidArgument(f"{out_dir} lacks files its manifest lists: {missing[:3]}")
    table = pq.read_table(files, columns=["item_id", "text_sha256", "vector"])
    if table.num_rows != manifest["count"]:
        raise InvalidArgument(f"{out_dir} has {table.num_rows} vectors; its manifest says {manifest['count']}")
    dimension = int(manifest["dimension"])
    vectors = (
        table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    ).reshape(-1, dimension)
    index = {key: row for row, key in enumerate(zip(table.column("item_id").to_pylist(), table.column("text_sha256").to_pylist()))}
    return ItemVectors(manifest, str(manifest["model_identity"]), dimension, vectors, index)


def attach_vectors(messages, vectors: ItemVectors) -> tuple[int, int]:
    """Set `vector` on every `pb.Item` whose id and text match a stored vector; returns
    (attached, left to the service to encode)."""
    from tastemaker.gateway.convert import domain_item

    attached = 0
    for message in messages:
        vector = vectors.get(message.item_id, domain_item(message).text())
        if vector is None:
            del message.vector[:]
            continue
        message.vector[:] = vector.tolist()
        attached += 1
    return attached, len(messages) - attached
