"""Lower each unique region of a Dynamo graph once, instead of the whole graph.

aot_autograd's cost grows with the graph: lowering a 32-block model to ATen traces 32 blocks,
and a warm disk cache cannot skip it. Dynamo's graph already shows the blocks (its nodes carry
``nn_module_stack``), so the graph is split there, at block boundaries, with
``torch.fx.passes.split_module``. Each region is keyed by its structure and input metadata;
one region per key goes through aot_autograd and the pipeline, and every region with the same
key calls the same compiled function: weights are inputs, so nothing in it is per instance.

Graphs where splitting could change meaning or buys nothing take the whole-graph path:
dynamic shapes, global-state nodes (grad mode, autocast), submodule calls, higher-order ops
(``nested_compile_region`` graphs are traced once per body by aot_autograd already), or no
blocks found.
"""

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
from torch.fx.passes.split_module import split_module

from . import pipeline
from ._compat import HigherOrderOperator, StorageWeakRef, aot_autograd, tracing_with_fake_mode
from .engines.base import ACTIVATION, SYMINT, WEIGHT, Engine
from .fingerprint import UnhashableArgument, describe
from .fx_utils import label_runs, output_node, placeholders
from .options import Options
from .report import Report, SubgraphRecord, record
from .sparse.runtime import module_path
from .split import assign_blocks

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Region:
    """One call of a split-out region in the outer graph."""

    name: str  # the submodule's attribute on the split graph
    gm: torch.fx.GraphModule  # returns a tuple
    inputs: list[Any]  # real weights, fake activations (Dynamo's), other values as they are
    fakes: list[Any]  # Dynamo's fake values of every input: what aot_autograd traces with
    weight_flags: list[bool]
    single_output: bool
    label: str | None  # block path, None for glue
    key: str | None  # None: not shareable, lowered alone


def unsuitable(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> str | None:
    """Why this Dynamo graph takes the whole-graph path, or None when regions apply."""
    for x in example_inputs:
        if isinstance(x, torch.SymInt) or (
            isinstance(x, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in x.shape)
        ):
            return "dynamic shapes"
    for node in gm.graph.nodes:
        if node.op == "call_module":
            return "submodule calls"
        if node.op in ("call_function", "call_method"):
            if isinstance(node.target, HigherOrderOperator):
                return "higher-order ops"
            if node.meta.get("example_value") is None:  # grad mode, autocast, other side effects
                return f"global-state or side-effect node {node.name}"
    return None


class RegionRunner(torch.nn.Module):
    """Calls a region's compiled function and returns what the split graph expects."""

    def __init__(self, compiled: Callable[..., Any], single_output: bool) -> None:
        super().__init__()
        self.compiled = compiled
        self.single_output = single_output

    def forward(self, *args: Any) -> Any:
        out = self.compiled(*args)
        return out[0] if self.single_output else tuple(out)


def compile_regions(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    weight_flags: list[bool],
    options: Options,
    engine: Engine,
    engine_reason: str,
    capture: list[pipeline.Lowered] | None = None,
) -> Callable[..., Any] | None:
    """The compiled forward of a Dynamo graph lowered region by region, or None when regions
    do not apply (the caller then lowers the whole graph). `capture`: see `pipeline.Compilation`."""
    start = time.perf_counter()
    reason = unsuitable(gm, example_inputs)
    labels, method = assign_blocks(gm) if reason is None else ({}, "none")
    if reason is None and method == "none":
        reason = "no repeated blocks"
    if reason is not None:
        log.info("trt_subgraph: lowering the whole graph (%s)", reason)
        return None
    split, regions = _split(gm, example_inputs, weight_flags, labels, engine)
    blocker = pipeline.cudagraph_blocker(options, example_inputs)

    lowered: dict[str, tuple[Region, pipeline.Lowered, Callable[..., Any]]] = {}
    instances: list[tuple[Region, Region]] = []  # (region, the region it shares code with)
    for region in regions:
        shared = lowered.get(region.key) if region.key is not None else None
        if shared is None:
            comp = pipeline.Compilation(
                options, engine, engine_reason, region.weight_flags, region.inputs, capture=capture
            )
            compiler = comp.region_compiler(cudagraphs=blocker is None)
            with tracing_with_fake_mode(region.fakes):
                compiled = aot_autograd(fw_compiler=compiler, inference_compiler=compiler)(region.gm, region.fakes)
            shared = lowered[region.key or region.name] = (region, comp.lowered, compiled)
        instances.append((region, shared[0]))
        setattr(split, region.name, RegionRunner(shared[2], region.single_output))

    report = _merge_reports(engine, engine_reason, method, labels, instances, lowered, options.sparsity)
    boxed = pipeline.assemble(split, weight_flags, blocker, report)
    report.compile_s = time.perf_counter() - start
    record(report)
    if capture is not None:
        _capture_instances(instances, lowered)

    def forward(*args: Any) -> Any:  # Dynamo calls a backend's result with positional arguments
        return boxed(list(args))

    forward.cudagraph = getattr(boxed, "cudagraph", None)  # type: ignore[attr-defined]
    return forward


def _split(gm, example_inputs, weight_flags, labels, engine) -> tuple[torch.fx.GraphModule, list[Region]]:
    ids = label_runs(gm, labels, ops=("call_function", "call_method"))  # a new region wherever the label changes
    label_of = {}
    for node, number in ids.items():
        label_of.setdefault(number, labels.get(node))
    split = split_module(gm, gm, lambda node: ids[node], keep_original_order=True)
    outer = {n.name: (x, flag) for n, x, flag in zip(placeholders(gm), example_inputs, weight_flags)}
    regions = []
    for call in split.graph.nodes:
        if call.op != "call_module":
            continue
        sub = getattr(split, call.target)
        fakes = [n.meta.get("example_value") for n in placeholders(sub)]
        inputs, flags = [], []
        for arg, fake in zip(call.args, fakes):
            if isinstance(arg, torch.fx.Node) and arg.op == "placeholder" and arg.name in outer:
                value, flag = outer[arg.name]
            else:
                value, flag = fake, False
            inputs.append(value)
            flags.append(flag)
        single = _return_tuple(sub)
        number = int(call.target.rsplit("_", 1)[1])
        key = region_key(sub, inputs, flags, engine)
        regions.append(Region(call.target, sub, inputs, fakes, flags, single, label_of.get(number), key))
    return split, regions


def _return_tuple(gm: torch.fx.GraphModule) -> bool:
    """Make `gm` return a tuple (aot_autograd wants one); True when it returned a single value."""
    output = output_node(gm)
    if isinstance(output.args[0], (tuple, list)):
        return False
    output.args = ((output.args[0],),)
    gm.recompile()
    return True


def region_key(gm: torch.fx.GraphModule, inputs: list[Any], weight_flags: list[bool], engine: Engine) -> str | None:
    """xxh3-128 of the region's structure and its inputs' metadata; None when not hashable.

    Besides what a piece's fingerprint holds: the identity of every callable no name identifies
    (closures, bound methods, partials: blocks calling different ones compute differently),
    each input's storage offset, which inputs share
    storage (aliasing changes what aot_autograd generates), plain values, and each weight's
    `Engine.weight_variant` (whether it is 2:4 where the engine may use sparse kernels).
    """
    kinds = [
        SYMINT if isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool) else WEIGHT if flag else ACTIVATION
        for x, flag in zip(inputs, weight_flags)
    ]
    try:
        text = [describe(gm, kinds, meta_key="example_value", opaque=_identity)]
    except UnhashableArgument:
        return None
    storages: dict[StorageWeakRef, int] = {}
    for position, x in enumerate(inputs):
        if isinstance(x, torch.Tensor):
            storage = storages.setdefault(StorageWeakRef(x.untyped_storage()), position)
            line = f"in {position} offset {x.storage_offset()} storage-of {storage}"
            if weight_flags[position] and (variant := engine.weight_variant(x)) is not None:
                line += f" variant {variant}"
        else:
            line = f"in {position} value {x!r}"
        text.append(line)
    return xxhash.xxh3_128_hexdigest("\n".join(text).encode())


def _identity(target: Any) -> str:
    """An opaque callable's token in a region key: the object itself (a bound method: its
    instance and function), so blocks calling different closures or instances never share code.
    The split graph holds every target while its keys are compared, so ids are not reused."""
    self, func = getattr(target, "__self__", None), getattr(target, "__func__", None)
    if self is not None and func is not None:
        return f"<opaque {id(self):x}.{id(func):x}>"
    return f"<opaque {id(target):x}>"


def _merge_reports(engine, engine_reason, method, labels, instances, lowered, sparsity_mode) -> Report:
    """One report for the Dynamo graph: each lowered region's records times its instances."""
    report = Report(
        engine=engine.name,
        engine_reason=engine_reason,
        block_method=method,
        blocks=len({label for label in labels.values() if label}),
    )
    counts = collections.Counter(id(shared) for _, shared in instances)
    records: dict[tuple[str, str | None], SubgraphRecord] = {}
    fallback_ops: dict[str, int] = {}
    layers: list[dict[str, Any]] | None = None
    for rep, result, _ in lowered.values():
        count = counts[id(rep)]
        for rec in result.report.subgraphs:
            merged = records.get((rec.fingerprint, rec.variant))
            if merged is None:
                records[(rec.fingerprint, rec.variant)] = dataclasses.replace(rec, instances=rec.instances * count)
            else:
                merged.instances += rec.instances * count
        for op, n in result.report.fallback_ops.items():
            fallback_ops[op] = fallback_ops.get(op, 0) + n * count
        if "layers" in result.report.sparsity:
            layers = layers or []
            for region, shared in instances:
                if shared is rep:
                    layers += [
                        {**layer, "layer": _rename(layer["layer"], rep.label, region.label)}
                        for layer in result.report.sparsity["layers"]
                    ]
    report.subgraphs = list(records.values())
    report.fallback_ops = fallback_ops
    report.sparsity = pipeline.sparsity_summary(sparsity_mode, layers)
    report.regions = {"regions": len(instances), "lowered": len(lowered)}
    return report


def _rename(layer: str, rep_label: str | None, label: str | None) -> str:
    """A layer name of the lowered region, moved to the same layer of another instance."""
    if rep_label is None or label is None:
        return layer
    old, new = module_path(rep_label), module_path(label)
    if old and new and layer.startswith(old):
        return new + layer[len(old) :]
    return layer


def _capture_instances(instances, lowered) -> None:
    """``trt_subgraph.capture``: the weights of instances that reused a lowered region."""
    by_rep = {id(rep): result for rep, result, _ in lowered.values()}
    for region, rep in instances:
        if region is not rep:
            by_rep[id(rep)].add_instance(region.inputs)
