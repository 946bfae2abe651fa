"""Tiny Hugging Face transformers models for the tests: small configs, random weights, nothing
downloaded. Each function builds the model from its base config below, updated with the keyword
arguments given; the test module is skipped where transformers is not installed."""

from __future__ import annotations

from typing import Any

import pytest
import torch

# torch 2.8's Dynamo breaks the graph where transformers' DynamicCache (made by a model with
# use_cache on: GPT-2, Llama) iterates its per-layer config; torch 2.9 and later trace it whole.
ONE_GRAPH_WITH_CACHE = pytest.mark.skipif(
    tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 9),
    reason="torch 2.8: Dynamo breaks the graph at transformers' DynamicCache (iterating _PerLayerConfigView)",
)

IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the small vocabularies

BERT = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
    **IDS,
)
GPT2 = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, **IDS)
LLAMA = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    max_position_embeddings=32,
    **IDS,
)


def _transformers() -> Any:
    return pytest.importorskip("transformers")


def bert(**config: Any) -> Any:
    """A ``BertModel`` of :data:`BERT` updated with `config`."""
    transformers = _transformers()
    return transformers.BertModel(transformers.BertConfig(**{**BERT, **config}))


def gpt2(**config: Any) -> Any:
    """A ``GPT2Model`` of :data:`GPT2` updated with `config`."""
    transformers = _transformers()
    return transformers.GPT2Model(transformers.GPT2Config(**{**GPT2, **config}))


def llama(**config: Any) -> Any:
    """A ``LlamaModel`` of :data:`LLAMA` updated with `config`."""
    transformers = _transformers()
    return transformers.LlamaModel(transformers.LlamaConfig(**{**LLAMA, **config}))
