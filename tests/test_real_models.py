"""Hugging Face transformers models, built from small configs with random weights (nothing is
downloaded), through the backend on CPU: each matches eager PyTorch in fp32, is lowered region
by region, builds each unique block once plus the glue around the blocks, and logs no warning.

Builds and reuses count unique regions: a model of N identical blocks has 1 block build, N - 1
reuses and one build per glue region (before the first block, after the last, between stacks).
"""

from __future__ import annotations

import logging

import hf_models
import pytest
import torch

import trt_subgraph

transformers = pytest.importorskip("transformers")

BATCH, SEQ = 2, 8
TIGHT = dict(rtol=1e-5, atol=1e-5)
IDS = hf_models.IDS


def bert():
    def inputs():
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, 5:] = 0  # the second sequence is padded
        return dict(input_ids=torch.randint(3, 100, (BATCH, SEQ)), attention_mask=mask)

    return hf_models.bert(), inputs


def gpt2():
    return hf_models.gpt2(), lambda: dict(input_ids=torch.randint(3, 100, (BATCH, SEQ)))


def llama():
    return hf_models.llama(), lambda: dict(input_ids=torch.randint(3, 100, (BATCH, SEQ)))


def t5():
    # Three layers per stack: the first block of each holds the relative position bias, so the
    # second and third are the repeated ones.
    config = transformers.T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=3,
        num_heads=2,
        decoder_start_token_id=0,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )

    def inputs():
        return dict(
            input_ids=torch.randint(2, 100, (BATCH, SEQ)), decoder_input_ids=torch.randint(2, 100, (BATCH, SEQ // 2))
        )

    return transformers.T5Model(config), inputs


def whisper_encoder():
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = transformers.WhisperConfig(
        vocab_size=100,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=2,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        num_mel_bins=8,
        max_source_positions=SEQ,
        decoder_start_token_id=1,
        **IDS,
    )
    return WhisperEncoder(config), lambda: dict(input_features=torch.randn(BATCH, 8, 2 * SEQ))


def vit():
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=16, patch_size=4
    )
    return transformers.ViTModel(config), lambda: dict(pixel_values=torch.randn(BATCH, 3, 16, 16))


# model, engine, builds (unique blocks + glue regions), reuses
CASES = [
    pytest.param(bert, "eager", 1 + 2, 1, id="bert"),
    pytest.param(bert, "inductor", 1 + 2, 1, id="bert-inductor"),
    pytest.param(gpt2, "eager", 1 + 2, 1, id="gpt2", marks=hf_models.ONE_GRAPH_WITH_CACHE),
    pytest.param(llama, "eager", 1 + 2, 1, id="llama", marks=hf_models.ONE_GRAPH_WITH_CACHE),
    # encoder and decoder: block 0 (position bias) and blocks 1-2 each, glue before, between, after
    pytest.param(t5, "eager", 4 + 3, 2, id="t5"),
    pytest.param(whisper_encoder, "eager", 1 + 2, 1, id="whisper-encoder"),
    pytest.param(vit, "eager", 1 + 2, 1, id="vit"),
]


def outputs(result):
    """The tensors a transformers ModelOutput holds (last hidden state, encoder state, pooled)."""
    return [v for v in result.to_tuple() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("make, engine, builds, reuses", CASES)
def test_transformers_model_matches_eager_and_builds_each_block_once(make, engine, builds, reuses, caplog):
    torch.manual_seed(0)
    model, inputs = make()
    model.eval()
    compiled = torch.compile(model, backend="trt_subgraph", options={"engine": engine, "cache_dir": None})
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        for _ in range(2):  # the second call, on fresh inputs, runs the compiled code again
            batch = inputs()
            expected, actual = outputs(model(**batch)), outputs(compiled(**batch))
            assert len(actual) == len(expected)
            for a, e in zip(actual, expected):
                torch.testing.assert_close(a, e, **TIGHT)
    assert [r.getMessage() for r in caplog.records] == []
    (report,) = trt_subgraph.reports()  # one Dynamo graph: no graph break
    totals = report.totals
    assert report.regions["path"] == "regions", report.regions
    assert (totals["builds"], totals["reuses"]) == (builds, reuses), str(report)
    assert totals["fallbacks"] == 0 and totals["demotions"] == 0
    assert report.engine == engine
