"""What one compilation did: blocks found, engines built or reused, fallbacks, time."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from ._state import on_reset

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SubgraphRecord:
    fingerprint: str
    nodes: int
    instances: int = 0
    # built, memory_hit, disk_hit, remote_hit (from the fleet's remote cache), fallback (the engine failed; PyTorch runs it), building (glue
    # that a worker builds in the background; PyTorch runs it until a later call swaps the
    # artifact in, and the status changes), or for a saved
    # plan: loaded (from the saved file) or pending (built at the first call: the saved artifact
    # does not fit this machine, or the engine cannot persist artifacts), or received (built by
    # another rank of torch.distributed, see `rank`)
    status: str = "built"
    # Seconds from asking for the artifact to holding it. Builds of one graph run concurrently
    # (in worker processes, see `trt_subgraph.workers`), so these overlap: the graph's wall time
    # is `Report.compile_s`.
    build_s: float = 0.0
    error: str | None = None
    # Built in a worker process rather than in this one.
    worker: bool = False
    # Where the ranks of torch.distributed split the builds (`trt_subgraph.ranks`): the rank that
    # got the artifact (built it or found it in its caches); status ``received`` on the others.
    # None where this process got every artifact itself.
    rank: int | None = None
    # Set where the engine's code depends on weight values (2:4 kernels): xxh3-64 of the
    # instances' `Engine.weight_variant`s. Same fingerprint, other variant: another artifact.
    variant: str | None = None
    # Filled while the model runs: one error message per piece whose engine failed on inputs
    # that PyTorch runs (that piece runs in PyTorch from then on).
    demotions: list[str] = dataclasses.field(default_factory=list)
    # Filled while the model runs: the input sizes (each once, as "2x4x71x70, 8") at which the
    # pieces of a subgraph compiled with size guards ran in PyTorch, being outside the guards.
    outside_guards: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    engine: str
    engine_reason: str
    block_method: str = "none"
    blocks: int = 0
    subgraphs: list[SubgraphRecord] = dataclasses.field(default_factory=list)
    fallback_ops: dict[str, int] = dataclasses.field(default_factory=dict)
    # The nodes that the ``torch_executed_ops`` option kept in PyTorch, each {"layer": module
    # path ('' outside any module), "op": ATen op}, every instance of a shared region listed.
    torch_executed: list[dict[str, str]] = dataclasses.field(default_factory=list)
    cudagraphs: str = "off"
    sparsity: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Which path lowered the graph and why: {"path": "regions", "reason": ..., "regions": n,
    # "lowered": unique} region by region (see ``regions``), {"path": "whole graph", "reason":
    # ...} at once; "loaded": True for a saved plan loaded; empty on the gradient path.
    regions: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The activations' memory format and why (option ``memory_format``), e.g.
    # "channels_last (53 2-D convolutions on cuda; 1 conversion in the graph)".
    memory_format: str = "preserve"
    compile_s: float = 0.0

    @property
    def totals(self) -> dict[str, Any]:
        count = lambda status: sum(1 for s in self.subgraphs if s.status == status)  # noqa: E731
        instances = sum(s.instances for s in self.subgraphs)
        builds = count("built")
        unbuilt = sum(s.instances for s in self.subgraphs if s.status in ("fallback", "building"))
        return {
            "unique_subgraphs": len(self.subgraphs),
            "instances": instances,
            "builds": builds,
            "memory_hits": count("memory_hit"),
            "disk_hits": count("disk_hit"),
            "remote_hits": count("remote_hit"),
            "loads": count("loaded"),
            "fallbacks": count("fallback"),
            "building": count("building"),
            "received": count("received"),
            "worker_builds": sum(1 for s in self.subgraphs if s.status == "built" and s.worker),
            "demotions": sum(len(s.demotions) for s in self.subgraphs),
            "outside_guards": sum(len(s.outside_guards) for s in self.subgraphs),
            "reuses": instances - builds - unbuilt,
            "fallback_nodes": sum(self.fallback_ops.values()),
            "build_s": round(sum(s.build_s for s in self.subgraphs), 4),
            "compile_s": round(self.compile_s, 4),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "engine_reason": self.engine_reason,
            "block_method": self.block_method,
            "blocks": self.blocks,
            "cudagraphs": self.cudagraphs,
            "regions": dict(self.regions),
            "memory_format": self.memory_format,
            "sparsity": self.sparsity,
            "fallback_ops": dict(self.fallback_ops),
            "torch_executed": [dict(node) for node in self.torch_executed],
            "subgraphs": [s.to_dict() for s in self.subgraphs],
            "totals": self.totals,
        }

    def _path(self) -> str:
        if self.regions.get("path") == "regions":
            return f"; regions: {self.regions['regions']}, lowered {self.regions['lowered']}"
        if self.regions:
            return f"; whole graph ({self.regions['reason']})"
        return ""

    def __str__(self) -> str:
        t = self.totals
        lines = [
            f"trt_subgraph: engine={self.engine} ({self.engine_reason}); blocks: {self.blocks} "
            f"found by {self.block_method}; cudagraphs: {self.cudagraphs}" + self._path(),
            f"memory format: {self.memory_format}",
            f"{'fingerprint':<34} {'instances':>9} {'nodes':>6} {'status':<10} {'build_s':>8}",
        ]
        for s in self.subgraphs:
            note = f"  {s.error}" if s.error else ""
            if s.demotions:
                note += f"  demoted at run time: {len(s.demotions)} ({s.demotions[-1]})"
            if s.outside_guards:
                note += f"  in PyTorch at {len(s.outside_guards)} input sizes outside its guards"
            variant = f"  variant {s.variant}" if s.variant else ""
            variant += f"  rank {s.rank}" if s.rank is not None else ""
            lines.append(
                f"{s.fingerprint:<34} {s.instances:>9} {s.nodes:>6} {s.status:<10} {s.build_s:>8.3f}{variant}{note}"
            )
        lines.append(
            f"unique subgraphs {t['unique_subgraphs']}, builds {t['builds']}, reuses {t['reuses']}, "
            f"memory hits {t['memory_hits']}, disk hits {t['disk_hits']}, remote hits {t['remote_hits']}, loaded {t['loads']}, "
            f"fallbacks {t['fallbacks']}, fallback nodes {t['fallback_nodes']}, compile {t['compile_s']:.3f} s"
            + (f", received from other ranks {t['received']}" if t["received"] else "")
        )
        if self.fallback_ops:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.fallback_ops.items()))
            lines.append(f"ran in PyTorch: {ops}")
        if self.torch_executed:
            kept = ", ".join(f"{n['layer'] or '(model)'} {n['op']}" for n in self.torch_executed)
            lines.append(f"kept in PyTorch by torch_executed_ops: {kept}")
        return "\n".join(lines)


_KEPT = 64  # reports that `reports()` keeps
_REPORTS: list[Report] = []
on_reset(_REPORTS.clear)
_COLLECTORS: list[list[Report]] = []


def record(report: Report) -> None:
    _REPORTS.append(report)
    del _REPORTS[:-_KEPT]
    for collected in _COLLECTORS:
        collected.append(report)
    log.info("%s", report)


@contextlib.contextmanager
def collect() -> Iterator[list[Report]]:
    """A list that receives every report recorded while the block runs, oldest first. Unlike
    :func:`reports` (the last 64), it keeps them all: for counting the compilations of a long
    run, such as a benchmark's sweep over many sizes."""
    collected: list[Report] = []
    _COLLECTORS.append(collected)
    try:
        yield collected
    finally:
        _COLLECTORS[:] = [c for c in _COLLECTORS if c is not collected]  # by identity: lists compare equal


def last_report() -> Report | None:
    """The report of the most recent compilation in this process (None before any)."""
    return _REPORTS[-1] if _REPORTS else None


def reports() -> list[Report]:
    """Reports of recent compilations, oldest first (one per Dynamo graph; a graph break makes two)."""
    return list(_REPORTS)
