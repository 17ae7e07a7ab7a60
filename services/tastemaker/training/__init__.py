"""Encoder fine-tuning on interaction logs with Ray Train (`tastemaker train`).

`pairs` turns an event log into (user history text → next item text) pairs, keeping away every
event an evaluation protocol holds out; `model` is the two-tower model (one shared encoder, mean
pooling) and the in-batch softmax loss; `trainer` runs it with Ray Train's `TorchTrainer` and
writes a Hugging Face model folder that `encoder.model_path` loads. See README.md here.
"""

from tastemaker.training.config import TrainConfig
from tastemaker.training.trainer import MANIFEST_NAME, read_manifest, run_training, train_encoder

__all__ = ["MANIFEST_NAME", "TrainConfig", "read_manifest", "run_training", "train_encoder"]
