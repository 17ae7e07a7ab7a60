"""`TrainConfig`: what `tastemaker train` runs, typed and validated like the service config."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from tastemaker.config import _Strict
from tastemaker.evaluation.protocols import TEST_QUANTILES, VALIDATION_QUANTILES

#: Protocols whose held-out targets training can be kept away from (see `pairs.training_events`).
HOLDOUT_PROTOCOLS = ("leave_last_out", "time_cutoff", "cold_items")


class TrainConfig(_Strict):
    """Fine-tuning the encoder as a two-tower model on (history text → next item text) pairs.

    Defaults are sized for a 2-core machine (a few minutes): 2,000 pairs, one epoch, two CPU
    workers. On a cluster raise `max_pairs`, `epochs`, `num_workers` and set `use_gpu`."""

    # -- data -------------------------------------------------------------------------------
    dataset: str = Field("movielens", description="'movielens', a MovieLens folder, or a .csv/.parquet interactions file.")
    items_path: Optional[str] = Field(None, description="With an interactions file: the items file (item text).")
    max_items: Optional[int] = Field(None, ge=1, description="Keep only the N most-interacted items (as `tastemaker eval`).")
    max_users: Optional[int] = Field(None, ge=1, description="Keep only the N most active users on those items.")
    holdout: tuple[Literal["leave_last_out", "time_cutoff", "cold_items"], ...] = Field(
        HOLDOUT_PROTOCOLS,
        description="Evaluation protocols whose validation and test targets training never sees: only events in "
        "the training set of every segment of every fold of these protocols are used. Empty = the whole log "
        "(a production model that `tastemaker eval` must not judge).",
    )
    cold_fraction: float = Field(0.1, gt=0, lt=1, description="cold_items: share of items hidden (as `tastemaker eval`).")
    test_quantiles: tuple[float, ...] = Field(TEST_QUANTILES, description="time_cutoff test moments.")
    validation_quantiles: tuple[float, ...] = Field(VALIDATION_QUANTILES, description="time_cutoff validation moments.")
    max_history_items: int = Field(5, ge=1, le=100, description="Items before the target that make the history text.")
    max_pairs: Optional[int] = Field(2_000, ge=1, description="Pairs kept (a seeded sample); None = all.")
    seed: int = Field(0, description="Seed of the data order, the hidden items, the pair sample, shuffling and init.")
    # -- model ------------------------------------------------------------------------------
    base_model_path: Optional[str] = Field(None, description="Model folder to start from; None = bundled all-MiniLM-L6-v2.")
    query_tower: Literal["history_text", "mean_of_items"] = Field(
        "history_text",
        description="history_text: the query tower encodes the history texts joined into one text; mean_of_items: "
        "it encodes each history item's text and averages the vectors (the way the service builds a profile).",
    )
    max_query_length: int = Field(128, ge=8, le=512, description="Tokens of a history text (longest kept: newest first).")
    max_item_length: int = Field(64, ge=8, le=512, description="Tokens of an item text.")
    # -- optimisation -----------------------------------------------------------------------
    epochs: int = Field(1, ge=1, description="Passes over the pairs.")
    batch_size: int = Field(32, ge=2, description="Global batch (pairs per step over all workers); in-batch negatives are per worker.")
    learning_rate: float = Field(3e-5, gt=0, description="AdamW learning rate (linear warm-up, then linear decay).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of the steps spent warming the learning rate up.")
    temperature: float = Field(0.05, gt=0, le=1, description="Softmax temperature of the in-batch loss (cosine / temperature).")
    # -- Ray Train --------------------------------------------------------------------------
    num_workers: int = Field(2, ge=1, description="Data-parallel training workers (TorchTrainer ScalingConfig).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (torch threads follow it).")
    use_gpu: bool = Field(False, description="One GPU per worker (a cluster); CPU workers otherwise.")
    ray_address: Optional[str] = Field(None, description="Join this Ray cluster; None = a local Ray instance (or the one running).")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.batch_size < 2 * self.num_workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must give each of the {self.num_workers} workers at least 2 pairs "
                "(in-batch negatives need a batch)"
            )
        if len(set(self.holdout)) != len(self.holdout):
            raise ValueError(f"holdout lists a protocol twice: {list(self.holdout)}")
        return self

    @property
    def per_worker_batch_size(self) -> int:
        """Pairs per step on one worker (the global batch split evenly)."""
        return self.batch_size // self.num_workers
