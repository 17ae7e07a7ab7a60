"""The Ray Train driver: `TorchTrainer` over N data-parallel workers (CPU here, GPU on a cluster).

Each worker loads the base model, wraps the two-tower model with `ray.train.torch.prepare_model`
(DDP when N > 1), reads its own shard of the pairs through `prepare_data_loader` (a
`DistributedSampler`), and trains with AdamW and the in-batch softmax loss. At the end of every
epoch all workers report the epoch's mean loss (averaged over workers) with `ray.train.report`,
and rank 0 attaches a `ray.train.Checkpoint`: the model as a Hugging Face folder. The driver
shows a progress bar fed by a small progress actor, prints one line per epoch, and copies the
last checkpoint into the output folder with a manifest.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from tastemaker.training.config import TrainConfig
from tastemaker.training.pairs import TrainingPair

#: The manifest written next to the model files.
MANIFEST_NAME = "tastemaker_train.json"
#: Pairs kept out of training to measure the loss before and after (at most this many).
HELD_OUT_PAIRS = 128


def pair_rows(pairs: Sequence[TrainingPair]) -> list[tuple[str, str, int, tuple[str, ...]]]:
    """(history text, item text, item key, history item texts): the key marks pairs with the
    same target item."""
    keys: dict[str, int] = {}
    return [(p.query_text, p.item_text, keys.setdefault(p.target_item_id, len(keys)), p.history_texts) for p in pairs]


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class TrainProgress:
        """Steps done and per-epoch records, written by the workers and read by the driver."""

        def __init__(self):
            self.steps = 0
            self.loss: Optional[float] = None
            self.epochs: list[dict[str, Any]] = []

        def step(self, count: int, loss: float) -> None:
            self.steps += count
            self.loss = loss

        def epoch(self, record: dict[str, Any]) -> None:
            self.epochs.append(record)

        def read(self) -> tuple[int, Optional[float], list[dict[str, Any]]]:
            return self.steps, self.loss, list(self.epochs)

    return TrainProgress.remote()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    from torch.utils.data import DataLoader

    from tastemaker.encoder.base import bundled_model_path
    from tastemaker.training.model import PairCollator, TwoTowerEncoder, in_batch_softmax_loss, load_base, pair_loss, save_model_folder

    config = TrainConfig.model_validate(loop_config["train"])
    rows = ray.get(loop_config["rows"])
    held_out = ray.get(loop_config["held_out"])
    progress = loop_config["progress"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed)
    if not config.use_gpu:
        torch.set_num_threads(max(1, int(config.cpus_per_worker)))

    base_path = Path(config.base_model_path).expanduser() if config.base_model_path else bundled_model_path()
    tokenizer, encoder = load_base(base_path)
    for name, parameter in encoder.named_parameters():
        # BERT's pooler (CLS dense layer) is not part of mean pooling: frozen, so DDP sees no
        # parameter without a gradient, and saved unchanged.
        if name.startswith("pooler."):
            parameter.requires_grad_(False)
    collator = PairCollator(tokenizer, config.max_query_length, config.max_item_length, config.query_tower)
    model = ray.train.torch.prepare_model(TwoTowerEncoder(encoder))
    inner: TwoTowerEncoder = model.module if hasattr(model, "module") else model
    loader = DataLoader(
        rows,
        batch_size=config.per_worker_batch_size,
        shuffle=True,
        drop_last=True,  # a batch of one pair has no negative
        collate_fn=collator,
        generator=torch.Generator().manual_seed(config.seed),
    )
    loader = ray.train.torch.prepare_data_loader(loader)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(rows)} training pairs over {world} workers make no batch of {config.per_worker_batch_size}; "
            "lower batch_size or raise max_pairs"
        )
    total_steps = steps_per_epoch * config.epochs
    warmup = int(config.warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / (warmup + 1) if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup)),
    )
    eval_batch = config.per_worker_batch_size
    held_out_before = pair_loss(inner, collator, held_out, config.temperature, eval_batch) if rank == 0 and held_out else None
    step = 0
    for epoch in range(config.epochs):
        if world > 1 and hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        model.train()
        total, count = 0.0, 0
        for batch in loader:
            query, item = model(batch["query"], batch["item"], batch.get("query_groups"))
            loss = in_batch_softmax_loss(query, item, config.temperature, batch["item_keys"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            total += float(loss.detach())
            count += 1
            if rank == 0:
                progress.step.remote(1, float(loss.detach()))
        # The epoch's mean loss over all workers' batches.
        sums = torch.tensor([total, float(count)], dtype=torch.float64)
        if world > 1:
            torch.distributed.all_reduce(sums)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "steps": step,
            "loss": float(sums[0] / max(1.0, float(sums[1]))),
            "learning_rate": scheduler.get_last_lr()[0],
        }
        if rank == 0:
            if held_out:
                metrics["held_out_loss_before"] = held_out_before
                metrics["held_out_loss"] = pair_loss(inner, collator, held_out, config.temperature, eval_batch)
            progress.epoch.remote(dict(metrics))
            with tempfile.TemporaryDirectory(prefix="tastemaker-ckpt-") as tmp:
                save_model_folder(inner, tokenizer, Path(tmp))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


def _ensure_ray(config: TrainConfig) -> None:
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(address=config.ray_address, logging_level=logging.WARNING, log_to_driver=False)


def run_training(
    config: TrainConfig,
    pairs: Sequence[TrainingPair],
    out_dir: Path,
    show_progress: bool = True,
    data_info: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Fine-tune on `pairs` with Ray Train and write the model folder and manifest into `out_dir`.

    Returns the manifest. Uses the running Ray instance if there is one (e.g. a test session),
    else starts one (or joins `config.ray_address`)."""
    import numpy as np
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from tqdm import tqdm

    from tastemaker.encoder.base import bundled_model_path

    if len(pairs) < config.batch_size:
        raise ValueError(f"{len(pairs)} training pairs are fewer than one batch ({config.batch_size})")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise ValueError(f"--out {out_dir} exists and is not an earlier `tastemaker train` output; pick an empty folder")
    _ensure_ray(config)
    rng = np.random.default_rng([config.seed, 59])
    order = rng.permutation(len(pairs))
    n_held = min(HELD_OUT_PAIRS, len(pairs) // 10)
    rows = pair_rows([pairs[int(i)] for i in order])
    held_out, train_rows = rows[:n_held], rows[n_held:]
    progress = _progress_actor()
    steps_per_worker = -(-len(train_rows) // config.num_workers) // config.per_worker_batch_size  # DistributedSampler pads
    storage = Path(tempfile.mkdtemp(prefix="tastemaker-train-"))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": config.model_dump(mode="json"),
            "rows": ray.put(train_rows),
            "held_out": ray.put(held_out),
            "progress": progress,
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=RunConfig(name="tastemaker-train", storage_path=str(storage)),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    started = time.monotonic()
    thread = threading.Thread(target=fit, name="tastemaker-train-fit", daemon=True)
    thread.start()
    printed = 0
    total = steps_per_worker * config.epochs
    with tqdm(total=total, desc="training (steps)", unit="step", disable=not show_progress) as bar:
        while True:
            alive = thread.is_alive()
            steps, loss, epochs = ray.get(progress.read.remote())
            bar.update(max(0, min(steps, total) - bar.n))
            if loss is not None:
                bar.set_postfix({"loss": f"{loss:.3f}"})
            for record in epochs[printed:]:
                held = f", held-out loss {record['held_out_loss_before']:.3f} -> {record['held_out_loss']:.3f}" if "held_out_loss" in record else ""
                bar.write(f"epoch {record['epoch']}/{config.epochs}: mean loss {record['loss']:.4f} ({record['steps']} steps){held}")
                printed += 1
            if not alive:
                break
            time.sleep(0.5)
    thread.join()
    ray.kill(progress)
    try:
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint")
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.iterdir():  # an earlier run's files (the folder was checked above)
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        result.checkpoint.to_directory(str(out_dir))
        metrics = dict(result.metrics or {})
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    manifest = {
        "kind": "tastemaker-train",
        "base_model": config.base_model_path or f"bundled all-MiniLM-L6-v2 ({bundled_model_path()})",
        "objective": (
            "two-tower in-batch softmax, shared encoder, mean pooling: "
            + ("history text (newest first)" if config.query_tower == "history_text" else "mean of the history items' vectors")
            + " -> next item text"
        ),
        "data": {
            **(data_info or {}),
            "pairs": len(pairs),
            "train_pairs": len(train_rows),
            "held_out_pairs": len(held_out),
        },
        "config": config.model_dump(mode="json"),
        "steps": metrics.get("steps"),
        "final_loss": metrics.get("loss"),
        "held_out_loss_before": metrics.get("held_out_loss_before"),
        "held_out_loss_after": metrics.get("held_out_loss"),
        "epochs": metrics.get("epoch"),
        "seconds": round(time.monotonic() - started, 1),
        "seed": config.seed,
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(model_dir: Path) -> Optional[dict[str, Any]]:
    """The manifest of a `tastemaker train` output folder, or None for any other model folder."""
    path = Path(model_dir).expanduser() / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def train_encoder(config: TrainConfig, out_dir: Path, show_progress: bool = True) -> dict[str, Any]:
    """`tastemaker train`: load the log as `tastemaker eval` does, keep only the events the
    `holdout` protocols let models train on, build the pairs, fine-tune, write folder + manifest."""
    from tastemaker.evaluation.data import load_interactions
    from tastemaker.training.pairs import build_pairs, training_events

    say = print if show_progress else (lambda *a, **k: None)
    data = load_interactions(
        config.dataset, items_path=config.items_path, seed=config.seed, max_items=config.max_items, max_users=config.max_users
    )
    mask = training_events(
        data,
        config.holdout,
        seed=config.seed,
        cold_fraction=config.cold_fraction,
        test_quantiles=config.test_quantiles,
        validation_quantiles=config.validation_quantiles,
    )
    pairs = build_pairs(data, mask, config.max_history_items, config.max_pairs, config.seed)
    say(
        f"train: {data.name}: {data.n_events} events, {int(mask.sum())} usable after holding out "
        f"{', '.join(config.holdout) or 'nothing'}; {len(pairs)} pairs; {config.num_workers} workers",
        flush=True,
    )
    info = {
        "dataset": data.name,
        "events": data.n_events,
        "training_events": int(mask.sum()),
        "holdout": list(config.holdout),
        "items": data.n_items,
        "users": data.n_users,
    }
    return run_training(config, pairs, out_dir, show_progress=show_progress, data_info=info)
