"""The vLLM adapter against a stand-in module that follows vLLM's documented offline API.

vLLM cannot run here (no GPU, and it pins its own torch), so `sys.modules["vllm"]` is replaced by a
small module with the same surface the adapter uses: `LLM(model=..., runner=..., pooler_config=...,
max_model_len=..., ...)`, `LLM.get_tokenizer()`, `LLM.embed(prompts)` returning outputs with
`.outputs.embedding`, `LLM.generate(prompts, SamplingParams(...))` returning outputs with
`.outputs[0].text`, and `vllm.config.PoolerConfig`. Like the real engine, the stand-in refuses
`embed` on a generate runner and vice versa, and refuses prompts longer than `max_model_len`.
The full encoder conformance suite runs against the adapter on top of it.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import sys
import types
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pytest

from tastemaker.config import EncoderConfig
from tastemaker.encoder import conformance
from tastemaker.encoder.base import BackendUnavailable, create_backend
from tastemaker.encoder.vllm_backend import VLLMBackend

DIM = 16
CLS, SEP = 101, 102


class FakeTokenizer:
    """Word-level, BERT-like ([CLS] ... [SEP]); `truncation`/`max_length` as in transformers."""

    eos_token_id = SEP

    def __call__(self, texts, truncation: bool = False, max_length: Optional[int] = None, **_):
        single = isinstance(texts, str)
        rows = []
        for text in [texts] if single else texts:
            ids = [CLS] + [1000 + int(hashlib.md5(w.encode()).hexdigest()[:6], 16) % 20000 for w in text.split()] + [SEP]
            if truncation and max_length is not None and len(ids) > max_length:
                ids = ids[: max_length - 1] + [SEP]
            rows.append(ids)
        return {"input_ids": rows[0] if single else rows}


@dataclass
class PoolerConfig:
    pooling_type: Optional[str] = None
    normalize: Optional[bool] = None


class SamplingParams:
    def __init__(self, max_tokens: int = 16, temperature: float = 1.0, **kwargs: Any):
        self.max_tokens = max_tokens
        self.temperature = temperature


class LLM:
    instances: list["LLM"] = []

    def __init__(self, model: str, runner: str = "auto", max_model_len: Optional[int] = None, pooler_config=None, **kwargs):
        self.model = model
        self.runner = runner
        self.max_model_len = max_model_len or 512
        self.pooler_config = pooler_config
        self.kwargs = kwargs
        self.embed_calls: list[list] = []
        LLM.instances.append(self)

    def get_tokenizer(self) -> FakeTokenizer:
        return FakeTokenizer()

    def _token_ids(self, prompt) -> list[int]:
        if isinstance(prompt, dict):
            return list(prompt["prompt_token_ids"])
        return FakeTokenizer()(prompt)["input_ids"]

    def embed(self, prompts, pooling_params=None, use_tqdm: bool = True, **kwargs):
        if self.runner != "pooling":
            raise ValueError("Embedding API is not supported by this model. Try --runner pooling")
        self.embed_calls.append(list(prompts))
        outputs = []
        for prompt in prompts:
            ids = self._token_ids(prompt)
            if not ids:
                raise ValueError("The decoder prompt cannot be empty")
            if len(ids) > self.max_model_len:
                raise ValueError(f"prompt length {len(ids)} is longer than max_model_len {self.max_model_len}")
            token_vectors = np.stack([np.random.default_rng(i).standard_normal(DIM) for i in ids])
            mode = (self.pooler_config.pooling_type if self.pooler_config else None) or "MEAN"
            vec = {"MEAN": token_vectors.mean(0), "CLS": token_vectors[0], "LAST": token_vectors[-1]}[mode]
            if self.pooler_config is None or self.pooler_config.normalize:
                vec = vec / np.linalg.norm(vec)
            outputs.append(types.SimpleNamespace(prompt_token_ids=ids, outputs=types.SimpleNamespace(embedding=vec.tolist())))
        return outputs

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True, **kwargs):
        if self.runner != "generate":
            raise ValueError("LLM.generate() is only supported for generative models")
        n = sampling_params.max_tokens if sampling_params else 16
        return [
            types.SimpleNamespace(prompt=p, outputs=[types.SimpleNamespace(text=" ".join(["because"] * n))])
            for p in prompts
        ]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # find_spec() sees it as installed
    module.LLM = LLM
    module.SamplingParams = SamplingParams
    config_module = types.ModuleType("vllm.config")
    config_module.PoolerConfig = PoolerConfig
    module.config = config_module
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.config", config_module)
    LLM.instances = []
    return module


@pytest.fixture
def started(fake_vllm) -> VLLMBackend:
    backend = create_backend(EncoderConfig(backend="vllm", device="cuda", max_length=32, model_path="/models/e5"))
    backend.start()
    return backend


def test_pooling_engine_is_built_from_config(started):
    llm = LLM.instances[0]
    assert llm.model == "/models/e5" and llm.runner == "pooling"
    assert llm.pooler_config == PoolerConfig(pooling_type="MEAN", normalize=True)
    assert llm.max_model_len == 32
    assert llm.kwargs["dtype"] == "auto" and llm.kwargs["gpu_memory_utilization"] == 0.45
    assert started.dimension == DIM


@pytest.mark.parametrize("pooling, expected", [("cls", "CLS"), ("last", "LAST")])
def test_pooling_type_follows_config(fake_vllm, pooling, expected):
    create_backend(EncoderConfig(backend="vllm", pooling=pooling, model_path="/m")).start()
    assert LLM.instances[-1].pooler_config.pooling_type == expected


@pytest.mark.parametrize("name", list(conformance.CHECKS))
def test_conformance_on_the_stand_in(started, name):
    conformance.CHECKS[name](started)


def test_texts_go_to_vllm_as_token_ids_truncated_on_the_right(started):
    llm = LLM.instances[0]
    words = [f"w{i}" for i in range(100)]
    started.encode([" ".join(words)])
    (prompt,) = llm.embed_calls[-1]
    ids = prompt["prompt_token_ids"]
    assert len(ids) == 32 and ids[0] == CLS and ids[-1] == SEP
    assert ids[1:31] == FakeTokenizer()(" ".join(words[:30]))["input_ids"][1:31]  # the head is kept


def test_all_texts_go_in_one_embed_call_and_come_back_in_order(started):
    llm = LLM.instances[0]
    texts = ["first text", "second", "a third, longer text here"]
    before = len(llm.embed_calls)
    vectors = started.encode(texts)
    assert len(llm.embed_calls) == before + 1
    for i, text in enumerate(texts):
        np.testing.assert_allclose(vectors[i], started.encode([text])[0], atol=1e-6)


def test_empty_tokenisation_gets_a_filler_prompt(fake_vllm, monkeypatch):
    """A tokenizer without special tokens makes [] of an empty text; vLLM refuses empty prompts."""
    monkeypatch.setattr(FakeTokenizer, "__call__", lambda self, texts, **kw: {
        "input_ids": [] if isinstance(texts, str) and not texts.strip() else
        [[5 + len(w) for w in t.split()] for t in texts] if not isinstance(texts, str) else [5]
    })
    backend = create_backend(EncoderConfig(backend="vllm", model_path="/m"))
    backend.start()
    vectors = backend.encode(["", "hello world"])
    assert vectors.shape == (2, DIM) and np.all(np.isfinite(vectors))


def test_generate_uses_a_second_engine_with_the_generate_runner(fake_vllm):
    backend = create_backend(
        EncoderConfig(backend="vllm", model_path="/m/embed", generation_model_path="/m/chat", generation_max_tokens=5)
    )
    backend.start()
    texts = backend.generate(["Why this movie?", "And this one?"])
    generator = LLM.instances[-1]
    assert generator.runner == "generate" and generator.model == "/m/chat"
    assert texts == ["because because because because because"] * 2
    assert backend.generate(["x"], max_tokens=2) == ["because because"]
    assert len(LLM.instances) == 2  # the generation engine is created once
    assert backend.generate([]) == []


def test_generate_without_a_generation_model_says_what_to_set(started):
    with pytest.raises(RuntimeError, match="generation_model_path"):
        started.generate(["hello"])


def test_embed_output_count_mismatch_is_an_error(started, monkeypatch):
    monkeypatch.setattr(LLM, "embed", lambda self, prompts, **kw: [])
    with pytest.raises(RuntimeError, match="0 embeddings for 2 texts"):
        started.encode(["a", "b"])


def test_start_without_vllm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    backend = VLLMBackend(EncoderConfig(backend="vllm", model_path="/m"))
    with pytest.raises(BackendUnavailable, match=r"pip install '\.\[vllm\]'"):
        backend.start()
