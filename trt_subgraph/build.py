"""Build each unique subgraph once: process memory first, then the disk cache, then the engine.

The key is the fingerprint plus everything else that changes an artifact (engine settings,
versions, device), so a hit is always an artifact built for exactly this subgraph here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from . import __version__
from ._state import on_reset
from .cache import FORMAT_VERSION as CACHE_FORMAT  # the entry format is part of every key
from .engines.base import CanonicalSubgraph, Engine
from .options import Options

log = logging.getLogger(__name__)

_MEMORY: dict[str, Any] = {}


@on_reset
def clear_memory_cache() -> None:
    """Forget the artifacts built or loaded in this process (``trt_subgraph.reset()`` does this)."""
    _MEMORY.clear()


def device_key(sub: CanonicalSubgraph) -> dict[str, Any]:
    devices = sorted({v.device for v in sub.example_inputs if isinstance(v, torch.Tensor)}, key=str)
    key: dict[str, Any] = {"devices": [d.type for d in devices]}
    cuda = [d for d in devices if d.type == "cuda"]
    if cuda:
        index = cuda[0].index if cuda[0].index is not None else torch.cuda.current_device()
        key["gpu"] = torch.cuda.get_device_name(index)
        key["capability"] = list(torch.cuda.get_device_capability(index))
    return key


class ArtifactStore:
    """Finds or builds the artifact for a canonical subgraph and says where it came from."""

    def __init__(self, engine: Engine, options: Options) -> None:
        self.engine = engine
        self.disk = None
        if options.disk_cache_dir is not None and engine.persistable:
            from .cache import DiskCache

            self.disk = DiskCache(options.disk_cache_dir, options.cache_size_limit)

    def key_parts(self, sub: CanonicalSubgraph, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "fingerprint": sub.fingerprint,
            "settings": self.engine.settings(),
            "versions": {"torch": torch.__version__, "trt_subgraph": __version__},
            "device": device_key(sub),
            "codegen": self.engine.codegen_key(sub),
            "extra": extra or {},
        }

    def get(
        self, sub: CanonicalSubgraph, weights: list[torch.Tensor], extra: dict[str, Any] | None = None
    ) -> tuple[Any, str, float]:
        """(artifact, status, seconds) with status ``memory_hit``, ``disk_hit`` or ``built``."""
        from .cache import make_key

        parts = self.key_parts(sub, extra)
        key = make_key(parts)
        if key in _MEMORY:
            return _MEMORY[key], "memory_hit", 0.0
        start = time.perf_counter()
        if self.disk is None:
            artifact, status = self.engine.build(sub, weights), "built"
        else:
            with self.disk.build_lock(key):
                artifact, status = self._load(key, sub), "disk_hit"
                if artifact is None:
                    artifact, status = self.engine.build(sub, weights), "built"
                    self._store(key, artifact, parts)
        _MEMORY[key] = artifact
        return artifact, status, time.perf_counter() - start

    def _load(self, key: str, sub: CanonicalSubgraph) -> Any:
        payload = self.disk.get(key)
        if payload is None:
            return None
        try:
            return self.engine.deserialize(payload, sub)
        except Exception as exc:  # a verified entry the installed engine cannot load: rebuild
            log.warning("trt_subgraph: cache entry %s could not be loaded (%s); rebuilding", key, exc)
            return None

    def _store(self, key: str, artifact: Any, parts: dict[str, Any]) -> None:
        try:
            payload = self.engine.serialize(artifact)
        except Exception as exc:
            log.warning(
                "trt_subgraph: %s artifact could not be serialized (%s); not cached on disk", self.engine.name, exc
            )
            return
        if payload is not None:
            self.disk.put(
                key,
                payload,
                {
                    "engine": self.engine.name,
                    "versions": parts["versions"],
                    "info": {"fingerprint": parts["fingerprint"]},
                },
            )
