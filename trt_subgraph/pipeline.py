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

from . import padding, runtime, workers
from ._compat import (
    erase_nodes,
    fuse_as_graphmodule,
    insert_subgm,
    make_boxed_func,
    stable_topological_sort,
    unset_fake_temporarily,
)
from .build import Builds, Pending
from .canonicalize import canonicalize
from .collectives import fresh_outputs, reinplace_all_reduces
from .engines.base import ACTIVATION, SYMINT, WEIGHT, CanonicalSubgraph, Engine, op_name
from .fingerprint import UnhashableArgument
from .fx_utils import is_size_arithmetic, output_node, placeholders
from .inputs import InputSource, input_sources
from .options import Options
from .partition import find_pieces, with_float_sizes
from .report import Report, SubgraphRecord, record
from .sparse import runtime as sparse_runtime
from .split import assign_blocks, inline_invoke_subgraphs

log = logging.getLogger(__name__)


@dataclasses.dataclass
class UniqueSubgraph:
    """A unique subgraph and the real weights of each of its instances (first instance first),
    with each instance's module path (``layers.3.attn``; '' for the model itself)."""

    sub: CanonicalSubgraph
    instance_weights: list[list[torch.Tensor]]
    instance_paths: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Lowered:
    """What lowering one graph produced: its report and its unique subgraphs.

    ``unique`` maps each group (fingerprint, plus ``/variant`` where weight values change the
    code) to its subgraph; ``pieces`` has, per piece instance in graph order, its group and
    where each of its weights comes from among the graph's inputs (None for a weight held by
    the graph itself); ``runners`` names, per attribute of the lowered graph that runs a piece,
    the piece's group (what a saved plan binds again); a piece inside a ``torch.cond`` branch
    is named by its path (``true_graph_0.piece_0``).
    """

    report: Report
    unique: dict[str, UniqueSubgraph]
    pieces: list[tuple[str, list[InputSource | None]]]
    runners: dict[str, str] = dataclasses.field(default_factory=dict)
    paths: list[str] = dataclasses.field(default_factory=list)  # per entry of `pieces`: its module path

    def add_instance(self, inputs: list[Any], rename: Callable[[str], str] = str) -> None:
        """Another call of the lowered graph with these `inputs` (a region that reuses a lowered
        one): each piece's weights become another instance of its unique subgraph, and `rename`
        turns a piece's module path into the same module's path in that region."""
        for (group, sources), path in zip(self.pieces, self.paths):
            weights = [source.value(inputs) if source is not None else None for source in sources]
            self.unique[group].instance_weights.append(weights)
            self.unique[group].instance_paths.append(rename(path))


class Compilation:
    """One graph's compilation, from the ATen graph to the assembled forward.

    Called as aot_autograd's compiler (``__call__``), it compiles a whole Dynamo graph: lowers it,
    assembles the forward (one CUDA graph unless something blocks it) and records the report.
    The region driver (``regions``) hands aot_autograd :meth:`region_compiler` instead: a region
    is only lowered, and the driver assembles and reports the whole graph from each region's
    :attr:`lowered`.

    ``capture``: a list that receives every :class:`Lowered` (``trt_subgraph.capture``; it holds
    real weights), or None. ``builds``: where lowering asks for artifacts; the region driver
    shares one among a graph's regions, so that all of them build at once (default: this
    graph's own). ``background``: the graph is glue between blocks, whose pieces may build in
    the background (see `Builds.request`; the driver swaps them in at a later call).
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
        builds: Builds | None = None,
        background: bool = False,
    ) -> None:
        self.options = options
        self.engine = engine
        self.engine_reason = engine_reason
        self.weight_flags = weight_flags
        self.real_inputs = real_inputs
        self.capture = capture
        if builds is None:
            builds = Builds(
                engine, options, workers.for_engine(engine, options.build_workers, workers.device_of(real_inputs))
            )
        self.builds = builds
        self.background = background
        self.lowered: Lowered | None = None
        self._bindings: list[tuple[runtime.PieceRunner, CanonicalSubgraph, Pending]] = []
        # For ``cudagraph_sizes``: the batch's size symbols where the region driver knows them
        # (else those of this graph's inputs), `padding.blocker` of the last graph lowered for
        # them, and its outputs' fake values.
        self.batch: Any = None
        self.rows_mixed: dict[Any, str | None] = {}
        self.output_values: list[Any] = []

    def __call__(self, gm: torch.fx.GraphModule, fake_inputs: list) -> Callable[[list], Any]:
        """The ``inference_compiler`` handed to aot_autograd for a whole graph; returns a boxed callable."""
        start = time.perf_counter()
        blocker = cudagraph_blocker(self.options, fake_inputs)
        lowered = self.lower(gm, cudagraphs=blocker is None)
        self.builds.finish()
        self.bind()
        pad, unpadded = batch_padding(
            self.options, blocker, fake_inputs, self.placeholder_flags, self.output_values, self.rows_mixed
        )
        forward = assemble(
            gm, self.placeholder_flags, blocker, lowered.report, options=self.options, pad=pad, unpadded=unpadded
        )
        lowered.report.compile_s = time.perf_counter() - start
        record(lowered.report)
        return forward

    def region_compiler(self, cudagraphs: bool) -> Callable[[torch.fx.GraphModule, list], Callable[[list], Any]]:
        """The ``inference_compiler`` for one region of a graph: lowers it and returns its boxed
        forward, neither recorded as a CUDA graph nor reported. `cudagraphs`: whether the whole
        graph's forward will be one CUDA graph (it decides whether sparse kernels pay). A region
        is one block or the glue between blocks already, so no block search cuts it further."""

        def compile_region(gm: torch.fx.GraphModule, fake_inputs: list) -> Callable[[list], Any]:
            self.lower(gm, cudagraphs, split_blocks=False)
            return make_boxed_func(gm.forward)

        return compile_region

    def lower(self, gm: torch.fx.GraphModule, cudagraphs: bool, split_blocks: bool = True) -> Lowered:
        """Replace the engine-supported pieces of `gm`, in place, by calls of their built
        artifacts; what is left runs in PyTorch. Also :attr:`lowered`. `split_blocks`: cut
        pieces at repeated-block boundaries too; without it only engine support and
        ``min_block_size`` cut them."""
        report = Report(engine=self.engine.name, engine_reason=self.engine_reason)
        inline_invoke_subgraphs(gm)
        self._classify_placeholders(gm)
        self._check_rows(gm, cudagraphs)
        report.sparsity = self._apply_sparsity(gm, cudagraphs)
        labels: dict[torch.fx.Node, str | None] = {}
        if split_blocks:
            labels, report.block_method = assign_blocks(gm)
            report.blocks = len({label for label in labels.values() if label})
        lowered = Lowered(report, {}, [])
        records: dict[str, SubgraphRecord] = {}
        pending: dict[str, Pending] = {}
        pieces = find_pieces(gm, labels, self.engine.is_node_supported, self.options.min_block_size)
        fresh: dict[str, frozenset[int]] = {}  # each piece's outputs that are new tensors
        for number, nodes in enumerate(pieces):
            self._replace_piece(gm, number, nodes, records, pending, lowered, fresh=fresh)
        self._lower_branches(gm, records, pending, lowered)
        reinplace_all_reduces(gm, fresh)
        stable_topological_sort(gm)
        gm.recompile()
        report.subgraphs = list(records.values())
        report.torch_executed = [
            {"layer": piece_module_path([n]), "op": op_name(n.target)}
            for n in gm.graph.nodes
            if n.op == "call_function" and self.engine.torch_executed(n)
        ]
        report.fallback_ops = dict(
            collections.Counter(
                op_name(n.target)
                for n in gm.graph.nodes
                if n.op == "call_function" and op_name(n.target) != "_operator.getitem" and not is_size_arithmetic(n)
            )
        )
        self.lowered = lowered
        if self.capture is not None:
            self.capture.append(lowered)
        return lowered

    def _lower_branches(self, gm: torch.fx.GraphModule, records, pending, lowered: Lowered, owner: str = "") -> None:
        """Lower the branches of each ``torch.cond`` in `gm` as `gm` itself: the cond stays in
        PyTorch and picks a branch, and the branch runs its built pieces. A branch input is a
        weight where the cond passes a weight of the graph; branches within branches too.
        `owner`: the path of `gm` below the lowered graph ('' for the graph itself)."""
        cond = getattr(torch.ops.higher_order, "cond", None)
        done: set[str] = set()
        for node in list(gm.graph.nodes):
            if cond is None or node.op != "call_function" or node.target is not cond:
                continue
            _, *branches, operands = node.args
            for attr in branches:
                if not isinstance(attr, torch.fx.Node) or attr.op != "get_attr" or attr.target in done:
                    continue
                done.add(attr.target)
                branch, path = getattr(gm, attr.target), f"{owner}.{attr.target}" if owner else attr.target
                for placeholder, operand in zip(placeholders(branch), operands):
                    if operand in self.index_of:
                        self.index_of[placeholder] = self.index_of[operand]
                pieces = find_pieces(branch, {}, self.engine.is_node_supported, self.options.min_block_size)
                for number, nodes in enumerate(pieces):
                    self._replace_piece(branch, number, nodes, records, pending, lowered, path)
                self._lower_branches(branch, records, pending, lowered, path)
                stable_topological_sort(branch)
                branch.recompile()

    def _classify_placeholders(self, gm: torch.fx.GraphModule) -> None:
        """Each placeholder of aot_autograd's graph: where it comes from among the traced inputs,
        its real value where it is a weight (None otherwise), and whether it is one."""
        self.index_of = {p: i for i, p in enumerate(placeholders(gm))}
        self.sources = input_sources(gm, self.real_inputs)
        self.placeholder_flags = [s is not None and self.weight_flags[s.position] for s in self.sources]
        self.placeholder_values = [
            s.value(self.real_inputs) if flag else None for s, flag in zip(self.sources, self.placeholder_flags)
        ]

    def _check_rows(self, gm: torch.fx.GraphModule, cudagraphs: bool) -> None:
        """With ``cudagraph_sizes``, before anything is replaced: whether the ops of `gm` keep
        the batch's rows apart (:attr:`rows_mixed`), and its outputs' values."""
        if self.options.cudagraph_sizes is None or not cudagraphs:
            return
        batch = self.batch
        if batch is None:
            batch, _ = padding.batch_symbols([p.meta.get("val") for p in placeholders(gm)], self.placeholder_flags)
        if batch is not None:
            self.rows_mixed = {batch: padding.blocker(gm, batch)}
        outputs = output_node(gm).args[0]
        self.output_values = [o.meta.get("val") if isinstance(o, torch.fx.Node) else o for o in outputs]

    def _apply_sparsity(self, gm: torch.fx.GraphModule, cudagraphs: bool) -> dict[str, Any]:
        """Route 2:4 linears and 1x1 convolutions to cuSPARSELt where the engine compiles that op;
        the report's entry."""
        if not self.engine.supports_sparse_linears or self.options.sparsity == "off":
            reason = None
            if self.options.sparsity != "off" and not self.engine.sparse_weights:
                reason = f"the {self.engine.name} engine runs no 2:4 sparse kernels (inductor and tensorrt do)"
            return sparsity_summary(self.options.sparsity, None, reason)
        layers = sparse_runtime.rewrite_linears(
            gm,
            self.placeholder_values,
            self.placeholder_flags,
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
        if node.op == "placeholder" and node in self.index_of and self.placeholder_flags[self.index_of[node]]:
            return WEIGHT
        return ACTIVATION

    def _real_value(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor:
        if node.op == "get_attr":
            return getattr(gm, node.target)
        return self.placeholder_values[self.index_of[node]]

    def _replace_piece(
        self, gm, number, nodes, records, pending, lowered: Lowered, owner: str = "", fresh: dict | None = None
    ) -> None:
        """`owner`: the path of `gm` below the lowered graph (a cond branch), '' for the graph.
        `fresh`: where given, gets the piece's :func:`trt_subgraph.collectives.fresh_outputs`."""
        name = f"piece_{number}"
        nodes = with_float_sizes(gm, nodes)
        sub_gm, inputs, outputs = fuse_as_graphmodule(gm, nodes, name, always_return_tuple=True)
        if fresh is not None:
            fresh[name] = fresh_outputs(sub_gm)
        kinds = [self._input_kind(n) for n in inputs]
        try:
            sub = canonicalize(sub_gm, kinds)
        except UnhashableArgument as exc:
            log.warning("trt_subgraph: %s runs in PyTorch: %s", name, exc)
            return
        weight_nodes = [n for n, kind in zip(inputs, kinds) if kind == WEIGHT]
        weights = [self._real_value(gm, n) for n in weight_nodes]
        with unset_fake_temporarily():  # real weights, inside aot_autograd's fake mode
            variant = group_variant(self.engine, weights)
        group = sub.fingerprint if variant is None else f"{sub.fingerprint}/{variant}"
        sources = [self.sources[self.index_of[n]] if n in self.index_of else None for n in weight_nodes]
        lowered.pieces.append((group, sources))
        path = piece_module_path(nodes)
        lowered.paths.append(path)
        rec = records.get(group)
        if rec is None:
            rec = records[group] = SubgraphRecord(fingerprint=sub.fingerprint, nodes=sub.num_ops, variant=variant)
            lowered.unique[group] = UniqueSubgraph(sub, [])
            pending[group] = self.builds.request(sub, weights, rec, background=self.background)
        rec.instances += 1
        lowered.unique[group].instance_weights.append(weights)
        lowered.unique[group].instance_paths.append(path)
        insert_subgm(gm, sub_gm, inputs, outputs, nodes[-1])
        erase_nodes(gm, nodes)
        runner = runtime.PieceRunner(sub, sub.gm, rec, module_path=path)  # PyTorch until bound
        setattr(gm, name, runner)
        self._bindings.append((runner, sub, pending[group]))
        lowered.runners[f"{owner}.{name}" if owner else name] = group

    def bind(self) -> None:
        """Give every piece whose artifact :attr:`builds` has its engine (the others wait for a
        later call: background builds); a piece whose engine failed keeps running in PyTorch."""
        waiting = []
        for runner, sub, pending in self._bindings:
            if pending.done:
                runner.bind(self._bind(sub, pending.artifact))
            else:
                waiting.append((runner, sub, pending))
        self._bindings = waiting

    def _bind(self, sub: CanonicalSubgraph, artifact: Any) -> Callable[..., Any]:
        if artifact is None:
            return sub.gm
        try:
            return self.engine.bind(artifact, sub)
        except Exception as exc:
            log.warning("trt_subgraph: binding subgraph %s failed (%s); running it in PyTorch", sub.fingerprint, exc)
            return sub.gm


def group_variant(engine: Engine, weights: list[torch.Tensor]) -> str | None:
    """What in a piece's weights changes the code built for it: xxh3-64 of each weight's
    `Engine.weight_variant`, or None when nothing does."""
    variants = [engine.weight_variant(w) for w in weights]
    return xxhash.xxh3_64_hexdigest(repr(variants).encode()) if any(v is not None for v in variants) else None


def piece_module_path(nodes: list[torch.fx.Node]) -> str:
    """The innermost module that holds every node of a piece Dynamo attributed to a module, as
    the report names layers (``layers.3.attn``); '' when that is the model itself."""
    common: list[str] | None = None
    for node in nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        paths = [str(path) for path, _ in stack.values()]
        if common is None:
            common = paths
        else:
            same = 0
            while same < min(len(common), len(paths)) and common[same] == paths[same]:
                same += 1
            common = common[:same]
    path = sparse_runtime.module_path(common[-1]) if common else ""
    return "" if path.startswith("L[") else path  # the compiled module itself (a function called it)


def cudagraph_blocker(options: Options, inputs: list) -> str | None:
    """Why a whole graph with these inputs cannot be one CUDA graph, or None when it can."""
    return "disabled by option" if not options.cudagraphs else runtime.cudagraph_blocker(inputs)


def sparsity_summary(mode: str, layers: list[dict[str, Any]] | None, reason: str | None = None) -> dict[str, Any]:
    """The report's sparsity entry; `layers` None when no linear was analyzed (mode off, engine),
    `reason` then why, where the engine runs no 2:4 kernels at all."""
    if layers is None:
        return {"mode": mode} if reason is None else {"mode": mode, "reason": reason}
    return {
        "mode": mode,
        "eligible": [layer["layer"] for layer in layers if layer["eligible"]],
        "sparse": [layer["layer"] for layer in layers if layer["sparse"]],
        "layers": layers,
    }


def batch_padding(
    options: Options,
    blocker: str | None,
    inputs: list[Any],
    weight_flags: list[bool],
    outputs: list[Any],
    rows_mixed: dict[Any, str | None],
) -> tuple[runtime.BatchPadding | None, str | None]:
    """(padding, None) when the forward's batch is padded to ``cudagraph_sizes``, (None, why not)
    when that option is set but the batch cannot be padded, (None, None) without the option."""
    if options.cudagraph_sizes is None or blocker is not None:
        return None, None
    return padding.plan(options.cudagraph_sizes, inputs, weight_flags, outputs, rows_mixed)


def assemble(
    run: Callable[..., Any],
    weight_flags: list[bool],
    blocker: str | None,
    report: Report,
    *,
    options: Options | None = None,
    pad: runtime.BatchPadding | None = None,
    unpadded: str | None = None,
    swap: Callable[[], bool] | None = None,
) -> Callable[[list], Any]:
    """The boxed forward of a whole graph: CUDA graphs (one per input-shape signature, at most
    ``options.cudagraph_max_shapes``, default options when None; the batch padded by `pad`)
    unless `blocker` says why not. `unpadded`: why ``cudagraph_sizes`` could not be applied,
    for the report. `swap`: called before each call, True when it gave pieces new runners
    (background builds); the CUDA graphs then record again. The forward's ``assembly``: these
    arguments but `run`, `report`, `options` and `swap` (what a saved plan assembles again)."""
    assembly = {"weight_flags": list(weight_flags), "blocker": blocker, "pad": pad, "unpadded": unpadded}

    def forward(args: list) -> Any:
        return run(*args)

    forward._boxed_call = True  # type: ignore[attr-defined]
    forward.assembly = assembly  # type: ignore[attr-defined]
    if blocker is not None:
        report.cudagraphs = f"off ({blocker})"
        if swap is None:
            return forward

        def swapping_forward(args: list) -> Any:
            swap()
            return run(*args)

        swapping_forward._boxed_call = True  # type: ignore[attr-defined]
        swapping_forward.assembly = assembly  # type: ignore[attr-defined]
        return swapping_forward
    static = [i for i, is_weight in enumerate(weight_flags) if is_weight]
    max_shapes = (options or Options()).cudagraph_max_shapes
    graphed = runtime.CUDAGraphForward(forward, static, max_shapes, pad)
    report.cudagraphs = "on"
    if pad is not None:
        report.cudagraphs += f" (batch padded to {', '.join(map(str, pad.sizes))})"
    elif unpadded is not None:
        report.cudagraphs += f" (batch not padded: {unpadded})"
        log.info("trt_subgraph: the batch is not padded to cudagraph_sizes: %s", unpadded)

    def graphed_forward(args: list) -> Any:
        if swap is not None and swap():
            graphed.invalidate()  # replays would run what the pieces ran before
        return graphed(args)

    graphed_forward._boxed_call = True  # type: ignore[attr-defined]
    graphed_forward.cudagraph = graphed  # type: ignore[attr-defined]
    graphed_forward.assembly = assembly  # type: ignore[attr-defined]
    return graphed_forward
