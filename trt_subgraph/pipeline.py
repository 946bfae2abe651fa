"""The inference pipeline on one ATen graph: split, partition, canonicalize, build, bind, assemble."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import xxhash

from . import runtime
from ._compat import (
    erase_nodes,
    fuse_as_graphmodule,
    insert_subgm,
    make_boxed_func,
    stable_topological_sort,
    unset_fake_temporarily,
)
from .build import ArtifactStore
from .canonicalize import canonicalize
from .engines.base import ACTIVATION, SYMINT, WEIGHT, CanonicalSubgraph, Engine, op_name
from .fingerprint import UnhashableArgument
from .fx_utils import placeholders
from .options import Options
from .partition import find_pieces
from .report import Report, SubgraphRecord, record
from .sparse import runtime as sparse_runtime
from .split import assign_blocks, inline_invoke_subgraphs

log = logging.getLogger(__name__)


@dataclasses.dataclass
class UniqueSubgraph:
    """A unique subgraph and the real weights of each of its instances (first instance first)."""

    sub: CanonicalSubgraph
    instance_weights: list[list[torch.Tensor]]


@dataclasses.dataclass
class Lowered:
    """What lowering one graph produced: its report and its unique subgraphs.

    ``unique`` maps each group (fingerprint, plus ``/variant`` where weight values change the
    code) to its subgraph; ``pieces`` has, per piece instance in graph order, its group and the
    graph input position of each of its weights (None for a weight held by the graph itself).
    """

    report: Report
    unique: dict[str, UniqueSubgraph]
    pieces: list[tuple[str, list[int | None]]]

    def add_instance(self, inputs: list[Any]) -> None:
        """Another call of the lowered graph with these `inputs` (a region that reuses a lowered
        one): each piece's weights become another instance of its unique subgraph."""
        for group, positions in self.pieces:
            weights = [inputs[i] if i is not None else None for i in positions]
            self.unique[group].instance_weights.append(weights)


class Compilation:
    """One graph's compilation, from the ATen graph to the assembled forward.

    Called as aot_autograd's compiler (``__call__``), it compiles a whole Dynamo graph: lowers it,
    assembles the forward (one CUDA graph unless something blocks it) and records the report.
    The region driver (``regions``) hands aot_autograd :meth:`region_compiler` instead: a region
    is only lowered, and the driver assembles and reports the whole graph from each region's
    :attr:`lowered`.

    ``capture``: a list that receives every :class:`Lowered` (``trt_subgraph.capture``; it holds
    real weights), or None.
    """

    def __init__(
        self,
        options: Options,
        engine: Engine,
        engine_reason: str,
        weight_flags: list[bool],
        real_inputs: list,
        *,
        capture: list[Lowered] | None = None,
    ) -> None:
        self.options = options
        self.engine = engine
        self.engine_reason = engine_reason
        self.weight_flags = weight_flags
        self.real_inputs = real_inputs
        self.capture = capture
        self.store = ArtifactStore(engine, options)
        self.lowered: Lowered | None = None

    def __call__(self, gm: torch.fx.GraphModule, fake_inputs: list) -> Callable[[list], Any]:
        """The ``inference_compiler`` handed to aot_autograd for a whole graph; returns a boxed callable."""
        start = time.perf_counter()
        blocker = cudagraph_blocker(self.options, fake_inputs)
        lowered = self.lower(gm, cudagraphs=blocker is None)
        forward = assemble(gm, self.weight_flags, blocker, lowered.report)
        lowered.report.compile_s = time.perf_counter() - start
        record(lowered.report)
        return forward

    def region_compiler(self, cudagraphs: bool) -> Callable[[torch.fx.GraphModule, list], Callable[[list], Any]]:
        """The ``inference_compiler`` for one region of a graph: lowers it and returns its boxed
        forward, neither recorded as a CUDA graph nor reported. `cudagraphs`: whether the whole
        graph's forward will be one CUDA graph (it decides whether sparse kernels pay)."""

        def compile_region(gm: torch.fx.GraphModule, fake_inputs: list) -> Callable[[list], Any]:
            self.lower(gm, cudagraphs)
            return make_boxed_func(gm.forward)

        return compile_region

    def lower(self, gm: torch.fx.GraphModule, cudagraphs: bool) -> Lowered:
        """Replace the engine-supported pieces of `gm`, in place, by calls of their built
        artifacts; what is left runs in PyTorch. Also :attr:`lowered`."""
        report = Report(engine=self.engine.name, engine_reason=self.engine_reason)
        inline_invoke_subgraphs(gm)
        report.sparsity = self._apply_sparsity(gm, cudagraphs)
        labels, report.block_method = assign_blocks(gm)
        report.blocks = len({label for label in labels.values() if label})
        self.index_of = {p: i for i, p in enumerate(placeholders(gm))}
        lowered = Lowered(report, {}, [])
        records: dict[str, SubgraphRecord] = {}
        artifacts: dict[str, Any] = {}
        pieces = find_pieces(gm, labels, self.engine.is_node_supported, self.options.min_block_size)
        for number, nodes in enumerate(pieces):
            self._replace_piece(gm, number, nodes, records, artifacts, lowered)
        stable_topological_sort(gm)
        gm.recompile()
        report.subgraphs = list(records.values())
        report.fallback_ops = dict(
            collections.Counter(
                op_name(n.target)
                for n in gm.graph.nodes
                if n.op == "call_function" and op_name(n.target) != "_operator.getitem"
            )
        )
        self.lowered = lowered
        if self.capture is not None:
            self.capture.append(lowered)
        return lowered

    def _apply_sparsity(self, gm: torch.fx.GraphModule, cudagraphs: bool) -> dict[str, Any]:
        """Route 2:4 linears to cuSPARSELt where the engine compiles that op; the report's entry."""
        if not self.engine.supports_sparse_linears or self.options.sparsity == "off":
            return sparsity_summary(self.options.sparsity, None)
        layers = sparse_runtime.rewrite_linears(
            gm,
            self.real_inputs,
            self.weight_flags,
            self.options.sparsity,
            cudagraphs,
            cache_dir=self.options.disk_cache_dir,
        )
        return sparsity_summary(self.options.sparsity, layers)

    def _input_kind(self, node: torch.fx.Node) -> str:
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, int)):
            return SYMINT
        if node.op == "get_attr":
            return WEIGHT
        if node.op == "placeholder" and self.weight_flags[self.index_of[node]]:
            return WEIGHT
        return ACTIVATION

    def _real_value(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
        if node.op == "get_attr":
            return getattr(gm, node.target)
        return self.real_inputs[self.index_of[node]]

    def _replace_piece(self, gm, number, nodes, records, artifacts, lowered: Lowered) -> None:
        name = f"piece_{number}"
        sub_gm, inputs, outputs = fuse_as_graphmodule(gm, nodes, name, always_return_tuple=True)
        kinds = [self._input_kind(n) for n in inputs]
        try:
            sub = canonicalize(sub_gm, kinds)
        except UnhashableArgument as exc:
            log.warning("trt_subgraph: %s runs in PyTorch: %s", name, exc)
            return
        weight_nodes = [n for n, kind in zip(inputs, kinds) if kind == WEIGHT]
        weights = [self._real_value(gm, n) for n in weight_nodes]
        with unset_fake_temporarily():  # real weights, inside aot_autograd's fake mode
            variants = [self.engine.weight_variant(w) for w in weights]
        variant = xxhash.xxh3_64_hexdigest(repr(variants).encode()) if any(v is not None for v in variants) else None
        group = sub.fingerprint if variant is None else f"{sub.fingerprint}/{variant}"
        lowered.pieces.append((group, [self.index_of.get(n) for n in weight_nodes]))
        rec = records.get(group)
        if rec is None:
            rec = records[group] = SubgraphRecord(fingerprint=sub.fingerprint, nodes=sub.num_ops, variant=variant)
            lowered.unique[group] = UniqueSubgraph(sub, [])
            artifacts[group] = self._artifact(sub, weights, rec)
        rec.instances += 1
        lowered.unique[group].instance_weights.append(weights)
        insert_subgm(gm, sub_gm, inputs, outputs, nodes[-1])
        erase_nodes(gm, nodes)
        setattr(gm, name, runtime.PieceRunner(sub, self._bind(sub, artifacts[group])))

    def _artifact(self, sub: CanonicalSubgraph, weights: list[torch.Tensor], rec: SubgraphRecord) -> Any:
        """The built or cached artifact, or None when the engine failed (PyTorch runs the piece)."""
        try:
            extra = {"variant": rec.variant} if rec.variant is not None else None
            artifact, rec.status, rec.build_s = self.store.get(sub, weights, extra)
            return artifact
        except Exception as exc:  # one piece failing must not take the model down
            rec.status, rec.error = "fallback", f"{type(exc).__name__}: {exc}"
            log.warning(
                "trt_subgraph: engine %r failed to build subgraph %s (%d ops): %s; running it in PyTorch",
                self.engine.name,
                sub.fingerprint,
                sub.num_ops,
                rec.error,
            )
            return None

    def _bind(self, sub: CanonicalSubgraph, artifact: Any) -> Callable[..., Any]:
        if artifact is None:
            return sub.gm
        try:
            return self.engine.bind(artifact, sub)
        except Exception as exc:
            log.warning("trt_subgraph: binding subgraph %s failed (%s); running it in PyTorch", sub.fingerprint, exc)
            return sub.gm


def cudagraph_blocker(options: Options, inputs: list) -> str | None:
    """Why a whole graph with these inputs cannot be one CUDA graph, or None when it can."""
    return "disabled by option" if not options.cudagraphs else runtime.cudagraph_blocker(inputs)


def sparsity_summary(mode: str, layers: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The report's sparsity entry; `layers` None when no linear was analyzed (mode off, engine)."""
    if layers is None:
        return {"mode": mode}
    return {
        "mode": mode,
        "eligible": [layer["layer"] for layer in layers if layer["eligible"]],
        "sparse": [layer["layer"] for layer in layers if layer["sparse"]],
        "layers": layers,
    }


def assemble(
    run: Callable[..., Any], weight_flags: list[bool], blocker: str | None, report: Report
) -> Callable[[list], Any]:
    """The boxed forward of a whole graph: one CUDA graph unless `blocker` says why not."""

    def forward(args: list) -> Any:
        return run(*args)

    forward._boxed_call = True  # type: ignore[attr-defined]
    if blocker is not None:
        report.cudagraphs = f"off ({blocker})"
        return forward
    static = [i for i, is_weight in enumerate(weight_flags) if is_weight]
    graphed = runtime.CUDAGraphForward(forward, static)
    report.cudagraphs = "on"

    def graphed_forward(args: list) -> Any:
        return graphed(args)

    graphed_forward._boxed_call = True  # type: ignore[attr-defined]
    graphed_forward.cudagraph = graphed  # type: ignore[attr-defined]
    return graphed_forward
