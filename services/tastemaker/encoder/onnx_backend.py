"""The CPU speed path: the same encoder exported to ONNX and run by ONNX Runtime, in fp32 or with
dynamic int8 weights (`encoder.onnx_precision`). Export, quantisation and their checks live in
`onnx_export`; this backend only loads the cached file and runs it through `BatchPipeline`.

int8 runs every text as its own forward pass. Dynamic quantisation computes one activation scale
per tensor, i.e. over every token of every text in a batch, so in a padded batch a text's vector
would depend on its neighbours (measured: cosine down to 0.96 between "ok" alone and "ok" in a
batch of catalog texts). One text per pass keeps vectors batch-independent and deterministic; the
texts are still tokenised in batches, ahead of the model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from tastemaker.config import EncoderConfig
from tastemaker.encoder.base import WARM_UP_TEXTS, BatchPipeline, check_model_folder, effective_max_length, resolve_model_path

logger = logging.getLogger(__name__)


def default_intra_op_threads() -> int:
    """Threads for one forward pass when the config leaves it open: what torch would use, which
    in a Ray replica follows the CPUs the replica reserved (Ray sets OMP_NUM_THREADS)."""
    import torch

    return max(1, torch.get_num_threads())


class OnnxBackend:
    """`EncoderBackend` over ONNX Runtime (CPUExecutionProvider) with a cached export of the model."""

    def __init__(self, config: EncoderConfig, cache_dir: Optional[Path] = None):
        self.config = config
        self.model_path: Path = resolve_model_path(config)
        self.cache_dir = cache_dir
        self.dimension = 0
        self.max_length = config.max_length
        self.onnx_path: Optional[Path] = None
        self.export_info: dict = {}
        self._session = None
        self._tokenizer = None
        self._input_names: tuple[str, ...] = ()
        self._pipeline: Optional[BatchPipeline] = None
        self.per_text = False
        #: What the int8 start-up check measured on this CPU (empty for fp32).
        self.int8_check: dict = {}

    def start(self) -> None:
        """Export (or find in the cache), open the session, warm up."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import onnxruntime as ort
        from transformers import AutoConfig, AutoTokenizer

        from tastemaker.encoder.onnx_export import OUTPUT_NAME, ensure_exported

        check_model_folder(self.model_path)
        exported = ensure_exported(self.config, self.cache_dir)
        self.onnx_path = exported.path
        self.export_info = exported.info
        self._input_names = exported.input_names
        self._output_name = OUTPUT_NAME
        self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path))
        model_config = AutoConfig.from_pretrained(str(self.model_path))
        self.max_length = effective_max_length(self.config.max_length, self._tokenizer, model_config)

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.config.intra_op_threads or default_intra_op_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads burn the CPU the tokenizer thread and the Serve event loop need.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        self.dimension = int(exported.dimension)
        self.per_text = self.config.onnx_precision == "int8"
        if self.per_text:
            self._check_int8_on_this_cpu(ort, options)
        self._pipeline = BatchPipeline.from_config(self._tokenize, self._forward, self.dimension, self.config)
        self.encode(list(WARM_UP_TEXTS))

    def _check_int8_on_this_cpu(self, ort, options) -> None:
        """Run the int8 model and the fp32 export on `INT8_CHECK_TEXTS` here, on this CPU: int8
        accuracy depends on the integer kernels the CPU has, so a model quantised (and checked)
        on one machine is checked again where it serves. Below `onnx_int8_min_cosine` the backend
        serves the fp32 export instead, with a warning. The result is kept in `int8_check`."""
        from tastemaker.encoder.onnx_export import INT8_CHECK_TEXTS, ensure_exported

        fp32 = ensure_exported(self.config.model_copy(update={"onnx_precision": "fp32"}), self.cache_dir)
        fp32_session = ort.InferenceSession(str(fp32.path), options, providers=["CPUExecutionProvider"])
        feeds = self._tokenize(list(INT8_CHECK_TEXTS))
        int8 = self._forward(feeds)
        reference = np.concatenate([fp32_session.run([self._output_name], row)[0] for row in feeds])
        cosine = (int8 * reference).sum(axis=1)
        worst = float(cosine.min())
        self.int8_check = {"min_cosine": worst, "bar": self.config.onnx_int8_min_cosine, "fell_back_to_fp32": False}
        if worst < self.config.onnx_int8_min_cosine:
            logger.warning(
                "int8 encoder model disagrees with fp32 on this CPU (min cosine %.4f < encoder.onnx_int8_min_cosine "
                "%.4f): serving the fp32 export instead",
                worst,
                self.config.onnx_int8_min_cosine,
            )
            self._session = fp32_session
            self.onnx_path = fp32.path
            self.per_text = False
            self.int8_check["fell_back_to_fp32"] = True

    def _tokenize(self, texts: list[str]) -> Any:
        if self.per_text:  # one unpadded (1, length) feed per text
            batch = self._tokenizer(texts, truncation=True, max_length=self.max_length)
            return [
                {name: np.asarray([batch[name][i]], dtype=np.int64) for name in self._input_names}
                for i in range(len(texts))
            ]
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np")
        return {name: batch[name].astype(np.int64, copy=False) for name in self._input_names}

    def _forward(self, feed: Any) -> np.ndarray:
        if self.per_text:
            return np.concatenate([self._session.run([self._output_name], row)[0] for row in feed])
        return self._session.run([self._output_name], feed)[0]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts; sorted by length inside so padding is minimal, returned in input order."""
        if self._pipeline is None:
            raise RuntimeError("OnnxBackend.encode called before start()")
        return self._pipeline.encode(list(texts))
