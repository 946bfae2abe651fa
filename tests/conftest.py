import pytest
import torch

from trt_subgraph import report
from trt_subgraph.build import clear_memory_cache


@pytest.fixture(autouse=True)
def fresh_compiler(tmp_path, monkeypatch):
    """Each test starts with no Dynamo cache, no in-memory artifacts and its own disk cache."""
    monkeypatch.setenv("TRT_SUBGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRT_SUBGRAPH_KEY_FILE", str(tmp_path / "cache.key"))
    torch.compiler.reset()
    clear_memory_cache()
    report._REPORTS.clear()
    yield
    torch.compiler.reset()
    clear_memory_cache()
