"""The two-tower model and its loss: one shared BERT-class encoder (mean pooling, L2-normalised,
the same vectors `encoder.transformers_backend` serves) embeds the history text (query tower)
and the next item's text (item tower); in-batch softmax makes each history pick its own next
item among the batch's items."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from tastemaker.encoder.transformers_backend import pool_hidden_states


def load_base(model_path: Path) -> tuple[Any, Any]:
    """(tokenizer, AutoModel) from a local folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    from tastemaker.encoder.base import check_model_folder

    check_model_folder(model_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModel.from_pretrained(str(model_path), dtype=torch.float32)
    return tokenizer, model


class TwoTowerEncoder(nn.Module):
    """Both towers share one encoder (so the item vectors the service computes come from the
    tower trained here). `forward` embeds both sides in one call, which keeps DDP to one forward
    per backward."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    def embed(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unit vectors of a tokenised batch (what the serving backend computes)."""
        hidden = self.encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        pooled = pool_hidden_states(hidden, inputs["attention_mask"], self.pooling)
        return nn.functional.normalize(pooled.float(), p=2, dim=1)

    def forward(
        self, query: dict[str, torch.Tensor], item: dict[str, torch.Tensor], query_groups: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(query vectors, item vectors). With `query_groups` (mean_of_items), `query` holds one
        text per history item and row r belongs to pair `query_groups[r]`: a pair's query vector
        is the normalised mean of its items' vectors."""
        queries = self.embed(query)
        if query_groups is not None:
            n = item["input_ids"].shape[0]
            sums = torch.zeros(n, queries.shape[1], dtype=queries.dtype, device=queries.device).index_add(0, query_groups, queries)
            queries = nn.functional.normalize(sums, p=2, dim=1)
        return queries, self.embed(item)


def in_batch_softmax_loss(
    query: torch.Tensor,
    item: torch.Tensor,
    temperature: float,
    item_keys: Optional[Sequence[Any]] = None,
) -> torch.Tensor:
    """Mean over rows i of −log softmax_j(q_i·d_j / τ)[i]: each query's own item is the positive,
    the batch's other items are its negatives.

    With `item_keys`, another row whose item is the same item as row i's is not a negative of
    row i (its logit is masked out): two users who picked the same next item in one batch must
    not push each other's history away from it."""
    logits = query @ item.T / temperature
    if item_keys is not None:
        keys = torch.as_tensor(list(item_keys) if not torch.is_tensor(item_keys) else item_keys, device=logits.device)
        same = (keys[:, None] == keys[None, :]) & ~torch.eye(keys.shape[0], dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(query.shape[0], device=query.device)
    return nn.functional.cross_entropy(logits, labels)


class PairCollator:
    """Tokenises a list of (history text, item text, item key, history item texts) into the two
    towers' inputs; with `query_tower="mean_of_items"` the query side is one text per history
    item plus `query_groups` (the pair each belongs to)."""

    def __init__(self, tokenizer: Any, max_query_length: int, max_item_length: int, query_tower: str = "history_text"):
        self.tokenizer = tokenizer
        self.max_query_length = max_query_length
        self.max_item_length = max_item_length
        self.query_tower = query_tower

    def _tokens(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))

    def __call__(self, rows: Sequence[tuple]) -> dict[str, Any]:
        queries, items, keys = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        batch: dict[str, Any] = {
            "item": self._tokens(items, self.max_item_length),
            "item_keys": torch.tensor(keys, dtype=torch.long),
        }
        if self.query_tower == "mean_of_items":
            groups = [n for n, row in enumerate(rows) for _ in row[3]]
            batch["query"] = self._tokens([text for row in rows for text in row[3]], self.max_item_length)
            batch["query_groups"] = torch.tensor(groups, dtype=torch.long)
        else:
            batch["query"] = self._tokens(queries, self.max_query_length)
        return batch


@torch.no_grad()
def pair_loss(
    model: TwoTowerEncoder,
    collator: PairCollator,
    rows: Sequence[tuple[str, str, int]],
    temperature: float,
    batch_size: int,
) -> float:
    """Mean in-batch loss over `rows` cut into consecutive batches (a fixed yardstick: used to
    compare a model before and after training on the same batches)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def to_device(value):
        return {k: v.to(device) for k, v in value.items()} if isinstance(value, dict) else value.to(device)

    losses = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        if len(chunk) < 2:
            continue
        batch = {k: to_device(v) for k, v in collator(chunk).items()}
        query, item = model(batch["query"], batch["item"], batch.get("query_groups"))
        losses.append(float(in_batch_softmax_loss(query, item, temperature, batch["item_keys"])))
    model.train(was_training)
    return sum(losses) / len(losses) if losses else float("nan")


def save_model_folder(model: TwoTowerEncoder, tokenizer: Any, folder: Path) -> None:
    """A Hugging Face model folder (config.json, model.safetensors, tokenizer files) that
    `encoder.model_path` loads with the transformers and onnx backends unchanged."""
    folder.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
