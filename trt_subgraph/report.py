"""What one compilation did: blocks found, engines built or reused, fallbacks, time."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ._state import on_reset

log = logging.getLogger(__name__)


@dataclasses.dataclass
class SubgraphRecord:
    fingerprint: str
    nodes: int
    instances: int = 0
    status: str = "built"  # built, memory_hit, disk_hit, or fallback (the engine failed; PyTorch runs it)
    build_s: float = 0.0
    error: str | None = None
    # Set where the engine's code depends on weight values (2:4 kernels): xxh3-64 of the
    # instances' `Engine.weight_variant`s. Same fingerprint, other variant: another artifact.
    variant: str | None = None

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
    cudagraphs: str = "off"
    sparsity: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Lowered region by region (see ``regions``): {"regions": n, "lowered": unique}; else empty.
    regions: dict[str, int] = dataclasses.field(default_factory=dict)
    compile_s: float = 0.0

    @property
    def totals(self) -> dict[str, Any]:
        count = lambda status: sum(1 for s in self.subgraphs if s.status == status)  # noqa: E731
        instances = sum(s.instances for s in self.subgraphs)
        builds = count("built")
        return {
            "unique_subgraphs": len(self.subgraphs),
            "instances": instances,
            "builds": builds,
            "memory_hits": count("memory_hit"),
            "disk_hits": count("disk_hit"),
            "fallbacks": count("fallback"),
            "reuses": instances - builds - sum(s.instances for s in self.subgraphs if s.status == "fallback"),
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
            "sparsity": self.sparsity,
            "fallback_ops": dict(self.fallback_ops),
            "subgraphs": [s.to_dict() for s in self.subgraphs],
            "totals": self.totals,
        }

    def __str__(self) -> str:
        t = self.totals
        lines = [
            f"trt_subgraph: engine={self.engine} ({self.engine_reason}); blocks: {self.blocks} "
            f"found by {self.block_method}; cudagraphs: {self.cudagraphs}"
            + (f"; regions: {self.regions['regions']}, lowered {self.regions['lowered']}" if self.regions else ""),
            f"{'fingerprint':<34} {'instances':>9} {'nodes':>6} {'status':<10} {'build_s':>8}",
        ]
        for s in self.subgraphs:
            note = f"  {s.error}" if s.error else ""
            variant = f"  variant {s.variant}" if s.variant else ""
            lines.append(
                f"{s.fingerprint:<34} {s.instances:>9} {s.nodes:>6} {s.status:<10} {s.build_s:>8.3f}{variant}{note}"
            )
        lines.append(
            f"unique subgraphs {t['unique_subgraphs']}, builds {t['builds']}, reuses {t['reuses']}, "
            f"memory hits {t['memory_hits']}, disk hits {t['disk_hits']}, fallback nodes "
            f"{t['fallback_nodes']}, compile {t['compile_s']:.3f} s"
        )
        if self.fallback_ops:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.fallback_ops.items()))
            lines.append(f"ran in PyTorch: {ops}")
        return "\n".join(lines)


_REPORTS: list[Report] = []
on_reset(_REPORTS.clear)


def record(report: Report) -> None:
    _REPORTS.append(report)
    del _REPORTS[:-64]
    log.info("%s", report)


def last_report() -> Report | None:
    """The report of the most recent compilation in this process (None before any)."""
    return _REPORTS[-1] if _REPORTS else None


def reports() -> list[Report]:
    """Reports of recent compilations, oldest first (one per Dynamo graph; a graph break makes two)."""
    return list(_REPORTS)
