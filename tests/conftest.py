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


class RedisServer:
    """A ``redis-server`` of the tests' own on 127.0.0.1 (nothing saved to disk); :meth:`stop` ends it."""

    def __init__(self, binary: str, directory) -> None:
        import socket
        import subprocess
        import time

        import redis

        for _ in range(5):  # another process may take the free port before the server binds it
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.proc = subprocess.Popen(
                [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
                cwd=directory,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
            deadline = time.monotonic() + 10
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    client.ping()
                    self.client = client
                    return
                except redis.ConnectionError:
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"{binary} did not start on 127.0.0.1")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_servers(tmp_path_factory):
    """Start Redis servers: ``redis_servers()`` gives a new :class:`RedisServer`, stopped at the end.

    The binary: ``$TRT_SUBGRAPH_TEST_REDIS_SERVER`` (``.ci/run`` sets it), else ``redis-server`` on
    the PATH. Where it or redis-py is missing the tests skip, saying so, except in CI (``CI=true``),
    where that is a failure.
    """
    import importlib.util
    import os
    import shutil

    binary = os.environ.get("TRT_SUBGRAPH_TEST_REDIS_SERVER") or shutil.which("redis-server")
    missing = []
    if not binary or not os.access(binary, os.X_OK):
        where = f" (TRT_SUBGRAPH_TEST_REDIS_SERVER={binary} is not executable)" if binary else ""
        missing.append(f"the redis-server binary{where} (apt-get install redis-server)")
    if importlib.util.find_spec("redis") is None:
        missing.append("redis-py (pip install -e '.[dev]')")
    if missing:
        reason = f"remote cache tests need {' and '.join(missing)}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; in CI that is a failure")
        pytest.skip(reason)
    started = []

    def start() -> RedisServer:
        server = RedisServer(binary, tmp_path_factory.mktemp("redis"))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def _shared_redis(redis_servers):
    return redis_servers()


@pytest.fixture
def redis_url(_shared_redis):
    """The URL of a Redis server shared by the tests, emptied before each test."""
    _shared_redis.client.flushall()
    return _shared_redis.url


@pytest.fixture
def eager_engine_with_2_4_variants(monkeypatch):
    """The eager engine, with 2:4 weights as another weight variant, as the inductor engine has on
    CUDA: code that depends on the weights' sparsity pattern, testable on a CPU."""
    from trt_subgraph import engines
    from trt_subgraph.engines.eager import EagerEngine
    from trt_subgraph.sparsity import analyze_weight

    class TwoFourEagerEngine(EagerEngine):
        def weight_variant(self, weight):
            return "2:4" if weight.dim() == 2 and analyze_weight(weight, kind="linear").pattern_ok else "dense"

    real = engines.engine_class
    monkeypatch.setattr(engines, "engine_class", lambda name: TwoFourEagerEngine if name == "eager" else real(name))
