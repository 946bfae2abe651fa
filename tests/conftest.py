import pytest
import torch

import trt_subgraph


@pytest.fixture(autouse=True)
def fresh_compiler(tmp_path, monkeypatch):
    """Each test starts with no Dynamo cache, no in-memory artifacts or reports and its own disk cache."""
    monkeypatch.setenv("TRT_SUBGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRT_SUBGRAPH_KEY_FILE", str(tmp_path / "cache.key"))
    torch.compiler.reset()
    trt_subgraph.reset()
    yield
    torch.compiler.reset()
    trt_subgraph.reset()
