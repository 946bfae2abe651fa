"""The inference pipeline on one ATen graph: split, partition, canonicalize, build, bind, assemble."""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Any, Callable

import torch
import torch.fx
import xxhash
from torch.fx.experimental.proxy_tensor import unset_fake_temporarily

from . import runtime, sparse_runtime
from ._compat import erase_nodes, fuse_as_graphmodule, insert_subgm, make_boxed_func, stable_topological_sort
from .build import ArtifactStore
from .canonicalize import canonicalize
from .engines.base import ACTIVATION, SYMINT, WEIGHT, CanonicalSubgraph, Engine, op_name
from .fingerprint import UnhashableArgument
from .options import Options
from .partition import find_pieces
from .report import Report, SubgraphRecord, record
from .split import assign_blocks, inline_invoke_subgraphs

log = logging.getLogger("trt_subgraph")


@dataclasses.dataclass
class UniqueSubgraph:
    """A unique subgraph and the real weights of each of its instances (first instance first)."""

    sub: CanonicalSubgraph
    instance_weights: list[list[torch.Tensor]]


# Set by ``trt_subgraph.capture`` to collect what compilations saw (holds real weights).
CAPTURE: list[list[UniqueSubgraph]] | None = None


class Compilation:
    """One graph's compilation, from the ATen graph to the assembled forward.

    The graph is a whole Dynamo graph, or one region of it (``region=True``, see ``regions``):
    a region's forward is neither recorded as a CUDA graph nor reported alone, since the
    region driver does both for the whole graph.
    """

    def __init__(
        self, options: Options, engine: Engine, engine_reason: str, weight_flags: list[bool], real_inputs: list,
        *, region: bool = False, region_blocker: str | None = None,
    ) -> None:
        self.options = options
        # A region takes the whole graph's CUDA graph verdict: it decides whether sparse kernels pay.
        self.region = region
        self.region_blocker = region_blocker
        self.engine = engine
        self.weight_flags = weight_flags
        self.real_inputs = real_inputs
        self.report = Report(engine=engine.name, engine_reason=engine_reason)
        self.store = ArtifactStore(engine, options)
        self.artifacts: dict[str, Any] = {}
        # Per piece instance: its fingerprint and the input position of each of its weights.
        self.piece_weights: list[tuple[str, list[int | None]]] = []

    def __call__(self, gm: torch.fx.GraphModule, fake_inputs: list) -> Callable[[list], Any]:
        """The ``inference_compiler`` handed to aot_autograd; returns a boxed callable."""
        start = time.perf_counter()
        if self.region:
            blocker = self.region_blocker
        else:
            blocker = cudagraph_blocker(self.options, fake_inputs)
        inline_invoke_subgraphs(gm)
        self._apply_sparsity(gm, cudagraphs=blocker is None)
        labels, self.report.block_method = assign_blocks(gm)
        self.report.blocks = len({label for label in labels.values() if label})
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.index_of = {p: i for i, p in enumerate(placeholders)}
        pieces = find_pieces(gm, labels, self.engine.is_node_supported, self.options.min_block_size)
        records: dict[str, SubgraphRecord] = {}
        unique: dict[str, UniqueSubgraph] = {}
        for number, nodes in enumerate(pieces):
            self._replace_piece(gm, number, nodes, records, unique)
        stable_topological_sort(gm)
        gm.recompile()
        self.report.subgraphs = list(records.values())
        self.report.fallback_ops = dict(collections.Counter(
            op_name(n.target) for n in gm.graph.nodes
            if n.op == "call_function" and op_name(n.target) != "_operator.getitem"
        ))
        self.unique = unique
        if CAPTURE is not None:
            CAPTURE.append(list(unique.values()))
        if self.region:
            return make_boxed_func(gm.forward)
        forward = assemble(gm, self.weight_flags, blocker, self.report)
        self.report.compile_s = time.perf_counter() - start
        record(self.report)
        return forward

    def _apply_sparsity(self, gm: torch.fx.GraphModule, cudagraphs: bool) -> None:
        """Route 2:4 linears to cuSPARSELt (inductor engine) and record which ones in the report."""
        if self.engine.name != "inductor" or self.options.sparsity == "off":
            self.report.sparsity = sparsity_summary(self.options.sparsity, None)
            return
        layers = sparse_runtime.rewrite_linears(
            gm, self.real_inputs, self.weight_flags, self.options.sparsity, cudagraphs,
            cache_dir=self.options.disk_cache_dir,
        )
        self.report.sparsity = sparsity_summary(self.options.sparsity, layers)

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

    def _replace_piece(self, gm, number, nodes, records, unique) -> None:
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
        self.piece_weights.append((group, [self.index_of.get(n) for n in weight_nodes]))
        rec = records.get(group)
        if rec is None:
            rec = records[group] = SubgraphRecord(fingerprint=sub.fingerprint, nodes=sub.num_ops, variant=variant)
            unique[group] = UniqueSubgraph(sub, [])
            self.artifacts[group] = self._artifact(sub, weights, rec)
        rec.instances += 1
        unique[group].instance_weights.append(weights)
        insert_subgm(gm, sub_gm, inputs, outputs, nodes[-1])
        erase_nodes(gm, nodes)
        setattr(gm, name, runtime.PieceRunner(sub, self._bind(sub, self.artifacts[group])))

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
                self.engine.name, sub.fingerprint, sub.num_ops, rec.error,
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


def assemble(run: Callable[..., Any], weight_flags: list[bool], blocker: str | None, report: Report) -> Callable[[list], Any]:
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
