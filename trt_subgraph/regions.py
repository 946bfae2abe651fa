"""Lower each unique region of a Dynamo graph once, instead of the whole graph.

aot_autograd's cost grows with the graph: lowering a 32-block model to ATen traces 32 blocks,
and a warm disk cache cannot skip it. Dynamo's graph already shows the blocks (its nodes carry
``nn_module_stack``), so the graph is split there, at block boundaries, with
``torch.fx.passes.split_module``. Each region is keyed by its structure and input metadata;
one region per key goes through aot_autograd and the pipeline, and every region with the same
key calls the same compiled function: weights are inputs, so nothing in it is per instance.

Global-state calls that change nothing here are removed first (:func:`remove_no_op_state`:
Hugging Face's ``autocast(enabled=False)`` around rotary embeddings, usage logging), and a
global-state scope that stays inside one block (autocast, vmap) moves with its region
(:func:`place_scopes`). ``torch.compiler.nested_compile_region`` marks blocks itself: each
``invoke_subgraph`` call is a region, and calls of one body share their lowering; a body that
writes in place is copied into its region, so that aot_autograd functionalizes it as plain code
rather than wrapping the call in ``auto_functionalized_v2``, which no engine runs.

Graphs where splitting could change meaning or buys nothing take the whole-graph path, and the
report says why (``regions["reason"]``): grad mode changing inside the graph, a scope that spans
blocks, other side-effect calls, submodule calls, higher-order ops other than
``invoke_subgraph``, a Python number read out of a tensor (``.item()``: a region traced alone
cannot read it, nor take it from another), or no blocks found.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import operator
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import xxhash
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.fx.passes.split_module import split_module

from . import padding, pipeline, runtime, saved, symbolic, workers
from ._compat import (
    HigherOrderOperator,
    StorageWeakRef,
    aot_autograd,
    autocast_calls,
    harmless_calls,
    invoke_subgraph_op,
    is_traceable_wrapper_subclass,
    set_grad_enabled_call,
    tracing_with_fake_mode,
    vmap_scope_calls,
    without_aot_autograd_cache,
    writes_an_argument,
)
from .build import Builds
from .engines.base import ACTIVATION, SYMINT, WEIGHT, Engine, device_types, op_name
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


def remove_no_op_state(gm: torch.fx.GraphModule) -> int:
    """Erase the global-state calls of a Dynamo graph that change nothing; return how many.

    Dynamo guards the global state a graph was traced under (grad mode, autocast), so the state
    in force now, while the backend runs, is the state every call of the graph starts from.
    Erased: autocast blocks that set the autocast state in force (transformers 4.x runs rotary
    embeddings under ``autocast(enabled=False)``), grad-mode calls that set the mode in force,
    and calls that only log usage or load something once (``harmless_calls``; a ``ModuleList``
    sliced in a forward logs), which run once here instead. aot_autograd's graph would hold
    none of them either: it traces through them.
    """
    enter, leave = autocast_calls()
    set_grad, harmless = set_grad_enabled_call(), harmless_calls()
    grad, cache = torch.is_grad_enabled(), torch.is_autocast_cache_enabled()
    autocast: dict[str, tuple[bool | None, torch.dtype | None]] = {}  # device type -> (enabled, dtype) in force
    opened: dict[torch.fx.Node, tuple[str, tuple[bool | None, torch.dtype | None], bool, bool]] = {}
    erased = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.kwargs:
            continue
        constant = not any(isinstance(a, torch.fx.Node) for a in node.args)
        if node.target in harmless and constant and not node.users:
            node.target(*node.args)
            gm.graph.erase_node(node)
            erased += 1
        elif node.target is set_grad and constant and len(node.args) == 1:
            if node.args[0] == grad:
                gm.graph.erase_node(node)
                erased += 1
            grad = node.args[0]
        elif node.target is enter and constant and node.args and isinstance(node.args[0], str):
            # torch.autocast(device_type, dtype=None, enabled=True, cache_enabled=None)
            device, dtype, enabled, cache_enabled = (*node.args, None, True, None)[:4]
            state = autocast.get(device) or _autocast_state(device)
            no_op = bool(enabled) == state[0] and dtype in (None, state[1]) and cache_enabled in (None, cache)
            opened[node] = (device, state, cache, no_op)
            autocast[device] = (bool(enabled), dtype or state[1])
            cache = cache if cache_enabled is None else cache_enabled
        elif node.target is leave and len(node.args) == 1 and node.args[0] in opened:
            start = node.args[0]
            device, autocast[device], cache, no_op = opened.pop(start)
            if no_op and len(start.users) == 1:
                gm.graph.erase_node(node)
                gm.graph.erase_node(start)
                erased += 2
    if erased:
        gm.recompile()
    return erased


def _autocast_state(device: str) -> tuple[bool | None, torch.dtype | None]:
    """(enabled, dtype) of autocast on `device` now; (None, None) for a device autocast does not know."""
    try:
        return torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    except RuntimeError:
        return None, None


def _scope_calls() -> dict[Any, Any]:
    """The calls that open a global-state scope Dynamo records, each with the call closing it."""
    pairs = [autocast_calls(), vmap_scope_calls()]
    return dict(pair for pair in pairs if pair is not None)


def unsuitable(gm: torch.fx.GraphModule) -> str | None:
    """Why this Dynamo graph takes the whole-graph path, or None when regions apply.

    Run :func:`remove_no_op_state` first. The scopes of global state left (see
    :func:`place_scopes`) are allowed here; any other call that has no value is a side effect
    that splitting could move, and so is a grad-mode change.
    """
    scopes = _scope_calls()
    scope_calls = set(scopes) | set(scopes.values())
    hop = invoke_subgraph_op()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            return "submodule calls"
        if node.op in ("call_function", "call_method"):
            if isinstance(node.target, HigherOrderOperator) and node.target is not hop:
                return f"higher-order op {op_name(node.target)}"
            if node.meta.get("example_value") is None and node.target not in scope_calls:
                return f"global-state or side-effect node {node.name} ({op_name(node.target)})"
            if _reads_a_tensor(node):
                return f"Python number read from a tensor ({node.name}: {op_name(node.target)})"
    return None


def _reads_a_tensor(node: torch.fx.Node) -> bool:
    """A node whose value is a Python number read out of a tensor: ``.item()`` (also of the 0-d
    tensor that Dynamo passes for a Python float argument once its value changes) or a value
    computed from one. A region traced on its own cannot read it, nor take it from another."""
    value = node.meta.get("example_value")
    if node.op == "call_method" and node.target in ("item", "tolist"):
        return True
    if isinstance(value, (torch.SymFloat, torch.SymBool)):
        return True
    return isinstance(value, torch.SymInt) and bool(free_unbacked_symbols(value))


def place_scopes(gm: torch.fx.GraphModule, labels: dict[torch.fx.Node, str | None]) -> str | None:
    """Put each global-state scope (an autocast or vmap block), from the call opening it to the
    call closing it, into the block of the nodes inside it by relabeling it in `labels`, so that
    it moves with its region; the reason for the whole-graph path when a scope spans blocks."""
    scopes = _scope_calls()
    closing = set(scopes.values())
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    nodes = list(gm.graph.nodes)
    stack: list[torch.fx.Node] = []
    for node in nodes:
        if node.op != "call_function":
            continue
        if node.target in scopes:
            stack.append(node)
        elif node.target in closing:
            if not stack or scopes[stack[-1].target] is not node.target:
                return f"global-state scope closed by {node.name} without a matching opening call"
            start = stack.pop()
            inside = [n for n in nodes[order[start] : order[node] + 1] if n in labels]
            blocks = sorted({labels[n] for n in inside if labels[n] is not None})
            if len(blocks) > 1:
                return f"global-state scope from {start.name} to {node.name} spans blocks {blocks[0]} and {blocks[-1]}"
            for n in inside:
                labels[n] = blocks[0] if blocks else None
    if stack:
        return f"global-state scope opened by {stack[-1].name} is never closed"
    return None


def _invoke_subgraph_labels(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str | None] | None:
    """Blocks marked by ``nested_compile_region``: each ``invoke_subgraph`` call with the
    indexing of its outputs; None when the graph has no such call."""
    hop = invoke_subgraph_op()
    calls = [n for n in gm.graph.nodes if hop is not None and n.op == "call_function" and n.target is hop]
    if not calls:
        return None
    labels: dict[torch.fx.Node, str | None] = {
        n: None for n in gm.graph.nodes if n.op in ("call_function", "call_method")
    }
    for index, call in enumerate(calls):
        labels[call] = f"invoke_subgraph.{index}"
        for user in call.users:
            if user.op == "call_function" and user.target is operator.getitem:
                labels[user] = labels[call]
        body = getattr(gm, call.args[0].target) if call.args[0].op == "get_attr" else None
        if isinstance(body, torch.fx.GraphModule) and _mutates(body):
            _inline_body(gm, call, body, labels)
    return labels


def _mutates(body: torch.fx.GraphModule) -> bool:
    """Whether a Dynamo-level body writes in place (a buffer update, ``x.add_(1)``, ``x[i] = v``):
    aot_autograd would wrap its call in ``auto_functionalized_v2``, which no engine runs."""
    for node in body.graph.nodes:
        if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
            return True
        if node.op == "call_function":
            target = node.target
            if writes_an_argument(target):
                return True
            name = getattr(target, "__name__", "")
            if (name.endswith("_") and not name.endswith("__")) or target in _IN_PLACE_OPERATORS:
                return True
    return False


_IN_PLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _inline_body(gm: torch.fx.GraphModule, call: torch.fx.Node, body: torch.fx.GraphModule, labels) -> None:
    """Replace an ``invoke_subgraph`` call by a copy of its body, labelled as the call was, so
    that its region is traced (and functionalized) as plain code. Bodies that call subgraphs of
    their own stay calls."""
    if any(n.op not in ("placeholder", "call_function", "call_method", "output") for n in body.graph.nodes):
        return
    env = dict(zip(placeholders(body), call.args[2:]))
    with gm.graph.inserting_before(call):
        result = gm.graph.graph_copy(body.graph, env)
    for node in body.graph.nodes:
        if node.op in ("call_function", "call_method"):
            labels[env[node]] = labels[call]
    for user in list(call.users):
        user.replace_all_uses_with(result[user.args[1]])
        labels.pop(user, None)
        gm.graph.erase_node(user)
    attr = call.args[0]
    labels.pop(call)
    gm.graph.erase_node(call)
    if not attr.users:
        gm.graph.erase_node(attr)
    gm.recompile()


class RegionRunner(torch.nn.Module):
    """Calls a region's compiled function and returns what the split graph expects.

    `paths`: the module paths of the region the function was lowered for and of this region
    (they differ where this region reuses another's code; observed pieces report the second).
    """

    def __init__(self, compiled: Callable[..., Any], single_output: bool, paths: tuple[str, str] = ("", "")) -> None:
        super().__init__()
        self.compiled = compiled
        self.single_output = single_output
        self.paths = paths

    def forward(self, *args: Any) -> Any:
        out = runtime.run_region(self.compiled, args, *self.paths)
        return out[0] if self.single_output else tuple(out)


def compile_regions(
    gm: torch.fx.GraphModule,
    example_inputs: list[Any],
    weight_flags: list[bool],
    options: Options,
    engine: Engine,
    engine_reason: str,
    capture: list[pipeline.Lowered] | None = None,
    memory_format: str = "preserve",
) -> tuple[saved.CompiledForward | None, str]:
    """The compiled forward of a Dynamo graph lowered region by region and why regions apply,
    or (None, why not) when they do not (the caller then lowers the whole graph). Global-state
    calls that change nothing are removed from `gm` (:func:`remove_no_op_state`) either way.
    `capture`: see `pipeline.Compilation`. `memory_format`: the report's entry (see
    `trt_subgraph.memory_format.apply`, which made the graph channels-last or not)."""
    start = time.perf_counter()
    remove_no_op_state(gm)
    reason = unsuitable(gm)
    labels: dict[torch.fx.Node, str | None] = {}
    if reason is None:
        marked = _invoke_subgraph_labels(gm)
        labels, method = (marked, "invoke_subgraph") if marked is not None else assign_blocks(gm)
        reason = "no repeated blocks" if method == "none" else place_scopes(gm, labels)
    if reason is not None:
        log.info("trt_subgraph: lowering the whole graph (%s)", reason)
        return None, reason
    split, regions = _split(gm, example_inputs, weight_flags, labels, engine)
    blocker = pipeline.cudagraph_blocker(options, example_inputs)
    outer = [p.meta.get("example_value") for p in placeholders(gm)]
    batch, _ = padding.batch_symbols(outer, weight_flags)  # what `cudagraph_sizes` pads
    rows_mixed: list[str | None] = []  # each lowered region's `padding.blocker`

    lowered: dict[str, tuple[Region, pipeline.Lowered, Callable[..., Any]]] = {}
    recorders: dict[str, saved.Recorder] = {}
    # Started now, before lowering, the build workers import torch while this process lowers; the
    # main process builds too, so one fewer than the unique regions.
    unique = len({region.key or region.name for region in regions})
    pool = workers.for_engine(engine, options.build_workers, workers.device_of(example_inputs), needed=unique - 1)
    builds = Builds(engine, options, pool)
    compilations: list[pipeline.Compilation] = []
    instances: list[tuple[Region, Region]] = []  # (region, the region it shares code with)
    for region in regions:
        shared = lowered.get(region.key) if region.key is not None else None
        if shared is None:
            comp = pipeline.Compilation(
                options,
                engine,
                engine_reason,
                region.weight_flags,
                region.inputs,
                capture=capture,
                builds=builds,
                background=options.background_glue and region.label is None,
            )
            compilations.append(comp)
            comp.batch = batch
            recorder = saved.Recorder(comp.region_compiler(cudagraphs=blocker is None), len(region.fakes))
            with tracing_with_fake_mode(region.fakes), without_aot_autograd_cache():
                compiled = aot_autograd(fw_compiler=recorder, inference_compiler=recorder)(region.gm, region.fakes)
            rows_mixed.append(comp.rows_mixed.get(batch))
            shared = lowered[region.key or region.name] = (region, comp.lowered, compiled)
            recorders[region.key or region.name] = recorder
        instances.append((region, shared[0]))
        paths = (module_path(shared[0].label or ""), module_path(region.label or ""))
        setattr(split, region.name, RegionRunner(shared[2], region.single_output, paths))
    builds.finish()  # the unique subgraphs of every region, all at once
    for comp in compilations:
        comp.bind()

    report = _merge_reports(engine, engine_reason, method, labels, instances, lowered, options.sparsity)
    report.memory_format = memory_format
    outputs = [o.meta.get("example_value") if isinstance(o, torch.fx.Node) else o for o in output_node(gm).args[0]]
    mixed = {batch: next((why for why in rows_mixed if why is not None), None)}
    pad, unpadded = pipeline.batch_padding(options, blocker, outer, weight_flags, outputs, mixed)

    def swap() -> bool:
        """Bind the glue whose background builds finished since the last call; True when any did."""
        if not builds.collect():
            return False
        for comp in compilations:
            comp.bind()
        _refresh_records(report, lowered)
        return True

    boxed = pipeline.assemble(
        split,
        weight_flags,
        blocker,
        report,
        options=options,
        pad=pad,
        unpadded=unpadded,
        swap=swap if builds.building else None,
    )
    report.compile_s = time.perf_counter() - start
    record(report)
    if capture is not None:
        _capture_instances(instances, lowered)

    def forward(*args: Any) -> Any:  # Dynamo calls a backend's result with positional arguments
        return boxed(list(args))

    forward.cudagraph = getattr(boxed, "cudagraph", None)  # type: ignore[attr-defined]
    index = {key: i for i, key in enumerate(lowered)}
    shared_key = {id(rep): key for key, (rep, _, _) in lowered.items()}
    plan = saved.Plan(
        options=options,
        engine=engine,
        device_types=device_types(example_inputs),
        assembly=boxed.assembly,
        report=report,
        outer=split,
        calls={region.name: (index[shared_key[id(rep)]], region.single_output) for region, rep in instances},
        graphs=[saved.PlannedGraph.of(recorders[key], result) for key, (_, result, _) in lowered.items()],
    )
    return saved.CompiledForward(forward, engine.name, plan.device_types, plan=plan), report.regions["reason"]


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
    Symbolic sizes are named as Dynamo's ShapeEnv names them: regions share code only where
    their sizes are the same symbols, so a guard that lowering one of them adds to Dynamo's
    ShapeEnv holds for all of them (keys are compared within one graph only). Sizes and plain
    values are read from the region's traced values (its placeholders' ``example_value``), which
    its code is lowered for: a region fed by the graph's own inputs gets their real tensors and
    sizes in `inputs` (``7`` where the traced value is ``s33``), and keys the same as the next
    region fed by the same symbols.
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
    traced = [p.meta.get("example_value") for p in placeholders(gm)]
    for position, x in enumerate(inputs):
        fake = traced[position] if position < len(traced) and traced[position] is not None else x
        if is_traceable_wrapper_subclass(x):
            line = f"in {position} {_subclass(x, position, storages)}"
        elif isinstance(x, torch.Tensor):
            storage = storages.setdefault(StorageWeakRef(x.untyped_storage()), position)
            line = f"in {position} offset {x.storage_offset()} storage-of {storage}"
            if symbolic.is_symbolic([fake]):
                line += f" size {tuple(fake.shape)} stride {fake.stride()}"
            if weight_flags[position] and (variant := engine.weight_variant(x)) is not None:
                line += f" variant {variant}"
        else:
            line = f"in {position} value {fake!r}"
        text.append(line)
    return xxhash.xxh3_128_hexdigest("\n".join(text).encode())


def _subclass(x: torch.Tensor, position: Any, storages: dict[StorageWeakRef, Any]) -> str:
    """A tensor-subclass input (a quantized weight): aot_autograd traces its inner tensors, so
    blocks share code only where the subclass type, its flattening context and each inner
    tensor's metadata and aliasing agree."""
    attrs, context = x.__tensor_flatten__()
    inner = []
    for attr in attrs:
        value, where = getattr(x, attr), f"{position}.{attr}"
        if is_traceable_wrapper_subclass(value):
            inner.append(f"{attr}: {_subclass(value, where, storages)}")
        else:
            storage = storages.setdefault(StorageWeakRef(value.untyped_storage()), where)
            inner.append(
                f"{attr}: {value.dtype} {tuple(value.shape)} {value.stride()} {value.device} "
                f"offset {value.storage_offset()} storage-of {storage}"
            )
    return f"subclass {type(x).__module__}.{type(x).__qualname__} {context!r} [{'; '.join(inner)}]"


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
    torch_executed: list[dict[str, str]] = []
    layers: list[dict[str, Any]] | None = None
    for rep, result, _ in lowered.values():
        count = counts[id(rep)]
        for rec in result.report.subgraphs:
            merged = records.get((rec.fingerprint, rec.variant))
            if merged is None:
                records[(rec.fingerprint, rec.variant)] = dataclasses.replace(rec, instances=rec.instances * count)
            else:
                merged.instances += rec.instances * count
                rec.demotions = merged.demotions  # one list each: what either records at run time shows
                rec.outside_guards = merged.outside_guards
        for op, n in result.report.fallback_ops.items():
            fallback_ops[op] = fallback_ops.get(op, 0) + n * count
        for region, shared in instances:
            if shared is rep:
                torch_executed += [
                    {**node, "layer": _rename(node["layer"], rep.label, region.label)}
                    for node in result.report.torch_executed
                ]
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
    report.torch_executed = torch_executed
    # Every region runs the same engine: a reason why it runs nothing sparse is any region's.
    reason = next((r.report.sparsity.get("reason") for _, r, _ in lowered.values() if r.report.sparsity), None)
    report.sparsity = pipeline.sparsity_summary(sparsity_mode, layers, reason)
    report.regions = {
        "path": "regions",
        "reason": f"repeated blocks found by {method}",
        "regions": len(instances),
        "lowered": len(lowered),
    }
    return report


def _refresh_records(report: Report, lowered) -> None:
    """Give the graph's report what background builds have put in the lowered regions' records."""
    finished = {
        (rec.fingerprint, rec.variant): rec
        for _, result, _ in lowered.values()
        for rec in result.report.subgraphs
        if rec.status != "building"
    }
    for merged in report.subgraphs:
        rec = finished.get((merged.fingerprint, merged.variant))
        if merged.status == "building" and rec is not None:
            merged.status, merged.build_s, merged.worker, merged.error = rec.status, rec.build_s, rec.worker, rec.error


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
            rename = functools.partial(_rename, rep_label=rep.label, label=region.label)
            by_rep[id(rep)].add_instance(region.inputs, rename)
