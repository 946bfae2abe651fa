"""Save a compiled forward and load it in another process without Dynamo, tracing or splitting.

The backend returns a :class:`CompiledForward`, which implements torch's ``SerializableCallable``
protocol, so ``torch.compile(f, fullgraph=True, backend="trt_subgraph").aot_compile(...)``,
``save_compiled_function`` and ``torch.compiler.load_compiled_function`` work (torch >= 2.9; on
2.9 to 2.11 set ``torch._dynamo.config.enable_aot_compile = True`` first). Its payload is the
assembled plan: the split graph, each lowered region's ATen graph with its engine pieces, each
unique piece's canonical subgraph, cache key and artifact bytes, and the CUDA-graph verdict. A
load rebuilds the runtime from the plan and the artifacts; nothing is traced, split or
partitioned again, and an artifact is built only where the saved one does not fit this machine
(another CPU instruction set, say) or the engine cannot persist it.

:func:`save` and :func:`load` wrap such a function in the disk cache's entry format: the file
is authenticated with the cache's key file (HMAC-SHA256) and refused, before anything is
unpickled, when its tag does not verify or it comes from another Python, torch,
trt_subgraph or GPU.

Saving needs graphs whose aot_autograd runtime wrapper only calls them: no input mutated in
place, no effect tokens, no tensor-subclass inputs, and no output of the Dynamo graph that is a
view of one of its inputs (the wrapper makes such outputs views again; a loaded plan returns
their values). Others compile and run as usual; saving them raises an error naming what is
unsupported. torch's own file (``save_compiled_function``) is a plain pickle: load only files
you made, or use :func:`save` and :func:`load`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import logging
import os
import pickle
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.fx
import xxhash

from . import __version__, engines, pipeline
from ._compat import (
    any_autocast_enabled,
    aot_compiled_backend_result,
    aot_graph_metadata,
    autocast_disabled,
    graph_pickle,
    graph_unpickle,
    new_fake_mode,
    serializable_callable_base,
)
from .build import ArtifactStore, remember, remembered, wait_for_background_builds
from .cache import make_key
from .cache.entry import Damaged, Foreign, encode_head, read_entry, read_header
from .cache.paths import default_key_file, load_or_create_secret, read_secret
from .engines.base import CanonicalSubgraph, Engine
from .fx_utils import output_node, placeholders
from .options import Options, default_cache_dir
from .report import Report, SubgraphRecord, record
from .runtime import PieceRunner

__all__ = ["CompiledForward", "Plan", "PlannedGraph", "Recorder", "load", "save"]

log = logging.getLogger(__name__)

PLAN_FORMAT = 1  # layout of the pickled plan; a plan of another layout is refused
_FILE_KIND = "trt_subgraph compiled function"


class Recorder:
    """aot_autograd's inference compiler for one graph, wrapped to keep what a saved plan needs:
    the lowered ATen graph; whether aot_autograd's runtime wrapper only calls it (see
    :func:`unsupported`); how many of its outputs are the caller's (aot_autograd appends the
    bases of outputs that alias one intermediate); which of those alias an input (the wrapper
    makes them views of the input again: a saved plan returns the values, so a saved graph must
    not hand such outputs to the user); and whether it runs with autocast off (it does when
    autocast was on while compiling).

    `num_inputs`: how many inputs the graph handed to aot_autograd has.
    """

    def __init__(self, compiler: Callable[[torch.fx.GraphModule, list], Any], num_inputs: int) -> None:
        self.compiler: Callable[[torch.fx.GraphModule, list], Any] | None = compiler
        self.num_inputs = num_inputs
        self.gm: torch.fx.GraphModule | None = None
        self.unsupported: str | None = "never compiled"
        self.num_outputs = 0
        self.aliases_input: list[int] = []
        self.disable_amp = False
        self.assembly: dict[str, Any] | None = None  # of the forward the compiler returned, if assembled

    def __call__(self, gm: torch.fx.GraphModule, fake_inputs: list) -> Any:
        meta = aot_graph_metadata()
        self.unsupported = unsupported(meta, len(placeholders(gm)), self.num_inputs)
        if meta is not None:
            self.num_outputs = len(meta.output_info)
            self.aliases_input = [
                i for i, info in enumerate(meta.output_info) if info.output_type.name in ("alias_of_input", "is_input")
            ]
        self.disable_amp = any_autocast_enabled()
        compiled = self.compiler(gm, fake_inputs)
        self.compiler = None  # it holds the real weights; aot_autograd calls it once
        self.gm = gm
        self.assembly = getattr(compiled, "assembly", None)
        return compiled


def unsupported(meta: Any, num_placeholders: int, num_inputs: int) -> str | None:
    """What makes aot_autograd's runtime wrapper do more than call the graph and drop the
    intermediate bases it appends, from its ViewAndMutationMeta `meta`; None when nothing does."""
    if meta is None:
        return "aot_autograd gave no graph metadata"
    mutated = [
        i
        for i, info in enumerate(meta.input_info)
        if info.mutates_data or info.mutates_metadata or getattr(info, "mutates_storage_metadata", False)
    ]
    if mutated:
        return f"inputs {mutated} of a compiled graph (a region, or the whole graph) are mutated in place"
    if getattr(meta, "tokens", None):
        return "the graph calls ops with side effects (effect tokens)"
    if any(type(m).__name__ == "SubclassCreationMeta" for m in getattr(meta, "subclass_inp_meta", None) or []):
        return "tensor-subclass inputs"
    if num_placeholders != num_inputs:
        return f"aot_autograd rewrote the inputs ({num_inputs} in, {num_placeholders} graph inputs: duplicated or aliased inputs)"
    return None


@dataclasses.dataclass
class PlannedGraph:
    """One lowered graph of a plan: its :class:`Recorder`, the group of each attribute that runs
    a piece, and each group's canonical subgraph (from ``pipeline.Lowered``, without the real
    weights it holds)."""

    recorder: Recorder
    runners: dict[str, str]
    subs: dict[str, CanonicalSubgraph]

    @classmethod
    def of(cls, recorder: Recorder, lowered: pipeline.Lowered) -> PlannedGraph:
        return cls(recorder, dict(lowered.runners), {group: unique.sub for group, unique in lowered.unique.items()})


@dataclasses.dataclass
class Plan:
    """What one compiled Dynamo graph is made of, as the backend assembled it (live objects;
    :meth:`CompiledForward.serialize_compile_artifacts` turns it into bytes).

    ``outer``: the split graph of the region path, whose submodules ``calls`` names (each: the
    index of its lowered graph in ``graphs`` and whether it returns a single value); None on the
    whole-graph path, where ``graphs`` holds the one lowered graph. Holds no weights.
    """

    options: Options
    engine: Engine
    device_types: list[str]  # of the graph's tensor inputs
    assembly: dict[str, Any]  # how `pipeline.assemble` made the forward (its ``assembly``)
    report: Report
    outer: torch.fx.GraphModule | None
    calls: dict[str, tuple[int, bool]]
    graphs: list[PlannedGraph]


_SerializableCallable: Any = serializable_callable_base()


class CompiledForward(_SerializableCallable):
    """The compiled forward of one Dynamo graph: call it with the graph's inputs, positionally.

    Implements torch's ``SerializableCallable`` (``serialize_compile_artifacts``,
    ``deserialize_compile_artifacts``). ``cudagraph``: the ``runtime.CUDAGraphForward`` that
    replays the forward, or None when it runs without CUDA graphs.
    """

    def __init__(
        self,
        forward: Callable[..., Any],
        engine: str,
        device_types: list[str],
        *,
        plan: Plan | None = None,
        saved: bytes | Callable[[], bytes] | None = None,
        unsaved: str | None = None,
    ) -> None:
        self._forward = forward
        self._plan = plan
        self._saved = saved  # the payload this forward was loaded from
        self._unsaved = unsaved  # why there is no plan
        self.engine = engine  # the engine's name
        self.device_types = device_types
        self.cudagraph = getattr(forward, "cudagraph", None)

    def __call__(self, *args: Any) -> Any:
        return self._forward(*args)

    @classmethod
    def serialize_compile_artifacts(cls, fn: CompiledForward) -> bytes:
        """The plan and its artifacts as bytes; RuntimeError when this forward cannot be saved."""
        if callable(fn._saved):  # a plan from the plan cache: its artifacts are put in now
            fn._saved = fn._saved()
        if fn._saved is not None:
            return fn._saved
        if fn._plan is None:
            raise RuntimeError(f"trt_subgraph: this compiled function cannot be saved: {fn._unsaved}")
        return pickle.dumps(_plan_state(fn._plan), protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> CompiledForward:
        """The forward rebuilt from :meth:`serialize_compile_artifacts`' bytes, with no tracing."""
        return _rebuild(pickle.loads(data), data)


# ---------------------------------------------------------------------------------------------
# Plan -> state


def _val_only(key: str) -> bool:
    return key == "val"


def _skeleton(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `gm`'s graph, without node meta, on a module whose submodules are empty
    stand-ins: the engines and compiled regions that `gm` calls are saved apart."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    root: dict[str, Any] = {}
    for node in graph.nodes:
        node.meta = {}
        if node.op == "call_module":
            root[node.target] = torch.nn.Module()
        elif node.op == "get_attr":  # constants aot_autograd lifted, bodies of higher-order ops
            value: Any = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            root[node.target] = value
    return torch.fx.GraphModule(root, graph)


def group_of(record: SubgraphRecord) -> str:
    """The group of a report record: its fingerprint, plus ``/variant`` where weight values
    change the code (as ``pipeline.Lowered`` names groups)."""
    return record.fingerprint if record.variant is None else f"{record.fingerprint}/{record.variant}"


class Unsavable(RuntimeError):
    """A plan that a saved function cannot hold; `reason` names the part of the graph."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"trt_subgraph: this compiled function cannot be saved: {reason}. Saving supports "
            "graphs that mutate no input in place and return no view of an input."
        )
        self.reason = reason


def _plan_state(plan: Plan, *, artifacts: bool = True) -> dict[str, Any]:
    """The plan as plain data (graphs pickled); :class:`Unsavable` naming what cannot be saved.
    `artifacts`: hold each artifact's bytes; without, groups name their artifacts by cache key
    only (a load then finds them in this process's memory or the caches: disk, remote)."""
    problems = [graph.recorder.unsupported for graph in plan.graphs if graph.recorder.unsupported]
    problems += _user_aliases(plan)
    problems += [
        "engine pieces inside torch.cond branches"
        for graph in plan.graphs
        if any("." in attr for attr in graph.runners)
    ][:1]
    if problems:
        raise Unsavable(problems[0])
    store = ArtifactStore(plan.engine, plan.options)
    subs: dict[str, CanonicalSubgraph] = {}
    graphs = []
    for graph in plan.graphs:
        for group, sub in graph.subs.items():
            subs.setdefault(group, sub)
        graphs.append(
            {
                "gm": graph_pickle(_skeleton(graph.recorder.gm), _val_only),
                "pieces": dict(graph.runners),
                "paths": {
                    attr: getattr(getattr(graph.recorder.gm, attr, None), "module_path", "") for attr in graph.runners
                },
                "num_outputs": graph.recorder.num_outputs,
                "disable_amp": graph.recorder.disable_amp,
            }
        )
    groups = {}
    for rec in plan.report.subgraphs:
        group = group_of(rec)
        sub = subs[group]
        extra = {"variant": rec.variant} if rec.variant is not None else None
        key = make_key(store.key_parts(sub, extra))
        groups[group] = {
            "gm": graph_pickle(sub.gm, _val_only),
            "kinds": list(sub.input_kinds),
            "record": rec.to_dict(),
            "key": key,
            "artifact": _artifact_bytes(store, key, rec) if artifacts and rec.status != "fallback" else None,
        }
    report = plan.report
    return {
        "format": PLAN_FORMAT,
        "options": dataclasses.asdict(plan.options),
        "engine": plan.engine.name,
        "device_types": list(plan.device_types),
        "assembly": plan.assembly,
        "outer": graph_pickle(_skeleton(plan.outer), _val_only) if plan.outer is not None else None,
        "calls": {  # with the module paths the region runner reports observed pieces under
            name: (index, single, tuple(getattr(plan.outer, name).paths))
            for name, (index, single) in plan.calls.items()
        },
        "graphs": graphs,
        "groups": groups,
        "report": {
            "block_method": report.block_method,
            "blocks": report.blocks,
            "fallback_ops": dict(report.fallback_ops),
            "torch_executed": [dict(node) for node in report.torch_executed],
            "memory_format": report.memory_format,
            "sparsity": report.sparsity,
            "regions": dict(report.regions),
        },
        # optional (older plans have none); only in a saved file: the disk cache keeps them too
        "engine_extras": plan.engine.saved_extras(plan.device_types) if artifacts else None,
    }


def _user_aliases(plan: Plan) -> list[str]:
    """Outputs of the Dynamo graph that are views of its inputs (a saved plan would return
    copies): aliasing outputs of a region matter only where the split graph returns them."""
    if plan.outer is None:
        aliased = plan.graphs[0].recorder.aliases_input
        return [f"outputs {aliased} are views of the graph's inputs"] if aliased else []
    outputs = output_node(plan.outer).args[0]
    returned: list[tuple[int, torch.fx.Node]] = []
    for position, value in enumerate(outputs if isinstance(outputs, (tuple, list)) else [outputs]):
        torch.fx.map_arg(value, lambda node, position=position: returned.append((position, node)))
    aliased = []
    for position, node in returned:
        call, index = node, 0
        if node.op == "call_function" and node.args and isinstance(node.args[0], torch.fx.Node):
            call, index = node.args[0], node.args[1]
        if call.op != "call_module" or call.target not in plan.calls:
            continue
        graph, single = plan.calls[call.target]
        if (0 if single else index) in plan.graphs[graph].recorder.aliases_input:
            aliased.append(position)
    return [f"outputs {sorted(set(aliased))} are views of the graph's inputs"] if aliased else []


def _artifact_bytes(store: ArtifactStore, key: str, rec: SubgraphRecord) -> bytes | None:
    """The artifact of `key` as the engine persists it (from this process, else the disk or
    remote cache); None where the engine cannot persist it (a load then builds it)."""
    if not store.engine.persistable:
        return None
    artifact = remembered(key)
    if artifact is not None:
        return store.engine.serialize(artifact)
    found = store.lookup(key)
    if found is None:
        log.warning(
            "trt_subgraph: the artifact of subgraph %s is neither in memory nor in the caches; a load will build it",
            rec.fingerprint,
        )
        return None
    return found[0]


# ---------------------------------------------------------------------------------------------
# State -> forward


@dataclasses.dataclass
class _Group:
    """One unique subgraph of a loaded plan: its artifact, bound once, shared by its pieces."""

    sub: CanonicalSubgraph
    record: SubgraphRecord
    store: ArtifactStore
    bound: Callable[..., Any] | None = None
    key: str = ""  # its artifact's cache key on this machine, with these settings

    @property
    def extra(self) -> dict[str, Any] | None:
        return {"variant": self.record.variant} if self.record.variant is not None else None

    def restore(self, saved_key: str, artifact: bytes | None) -> None:
        """Bind the artifact from this process's memory, from the saved bytes, else from the
        caches (disk, remote); else leave it to the first call, which builds it with real
        weights. Several groups may restore at once, from threads inside the engine's
        ``loading()``."""
        if self.record.status == "fallback":
            self.bound = self.sub.gm
            return
        found, status = remembered(self.key), "memory_hit"
        if found is None and artifact is not None and self.key != saved_key:
            log.warning(
                "trt_subgraph: saved artifact of subgraph %s was built for another machine or other "
                "settings (instruction set, compiler, engine settings); looking for it in the caches, "
                "else building it at the first call",
                self.sub.fingerprint,
            )
            artifact = None
        if found is None:
            cached = (artifact, "loaded") if artifact is not None else self.store.lookup(self.key)
            if cached is not None:
                try:
                    found, status = self.store.engine.deserialize(cached[0], self.sub), cached[1]
                    remember(self.key, found)
                except Exception as exc:
                    log.warning(
                        "trt_subgraph: the %s artifact of subgraph %s failed to load (%s)",
                        "saved" if cached[1] == "loaded" else "cached",
                        self.sub.fingerprint,
                        exc,
                    )
        self.record.build_s = 0.0
        if found is None:
            self.record.status = "pending"
            return
        self.record.status = status
        self.bound = self._bind(found)

    def runner(self, weights: list[torch.Tensor]) -> Callable[..., Any]:
        if self.bound is None:
            try:
                artifact, self.record.status, self.record.build_s = self.store.get(self.sub, weights, self.extra)
                self.bound = self._bind(artifact)
            except Exception as exc:  # one piece failing must not take the model down
                self.record.status, self.record.error = "fallback", f"{type(exc).__name__}: {exc}"
                log.warning(
                    "trt_subgraph: engine %r failed to build subgraph %s: %s; running it in PyTorch",
                    self.store.engine.name,
                    self.sub.fingerprint,
                    self.record.error,
                )
                self.bound = self.sub.gm
        return self.bound

    def _bind(self, artifact: Any) -> Callable[..., Any]:
        try:
            return self.store.engine.bind(artifact, self.sub)
        except Exception as exc:
            log.warning(
                "trt_subgraph: binding subgraph %s failed (%s); running it in PyTorch", self.sub.fingerprint, exc
            )
            return self.sub.gm


class _FirstBuild:
    """The runner of a loaded piece whose artifact the load could not restore, until its first
    call: that call has the real weights, builds the group's artifact with them (once per
    group) and puts the group's runner in the piece's place."""

    def __init__(self, group: _Group) -> None:
        self.group = group
        self.piece: PieceRunner | None = None  # the piece this runner stands in for

    def __call__(self, *args: Any) -> Any:
        runner = self.group.runner([args[i] for i in self.group.sub.weight_positions])
        self.piece.runner = runner
        return runner(*args)


class _LoadedGraph:
    """A lowered graph of a loaded plan, called as aot_autograd calls it: positional inputs, its
    first `num_outputs` outputs (the bases of aliasing outputs it appends are dropped), autocast
    off where it was on while compiling. :meth:`check_weights` tells whether the weights of one
    call are what the saved code was generated for."""

    def __init__(self, gm: torch.fx.GraphModule, num_outputs: int, disable_amp: bool, groups: dict[str, _Group]):
        self.gm = gm
        self.num_outputs = num_outputs
        self.disable_amp = disable_amp
        index = {node: i for i, node in enumerate(placeholders(gm))}
        self.weights: list[tuple[_Group, list[Any]]] = []  # per piece: its weights' graph inputs (or constants)
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in groups:
                group = groups[node.target]
                args = [node.args[i] for i in group.sub.weight_positions]
                self.weights.append((group, [index[a] if a in index else getattr(gm, a.target) for a in args]))

    def __call__(self, *args: Any) -> tuple:
        if self.disable_amp:
            with autocast_disabled():
                return tuple(self.gm(*args)[: self.num_outputs])
        return tuple(self.gm(*args)[: self.num_outputs])

    def check_weights(self, args: tuple) -> None:
        """Raise RuntimeError when a piece's weights among `args` differ from the saved model's
        where the engine's code depends on weight values (their 2:4 pattern)."""
        for group, sources in self.weights:
            weights = [args[s] if isinstance(s, int) else s for s in sources]
            if pipeline.group_variant(group.store.engine, weights) != group.record.variant:
                raise RuntimeError(
                    f"trt_subgraph: the weights of subgraph {group.sub.fingerprint} differ from the saved "
                    "model's in their 2:4 sparsity pattern, which the saved code depends on; compile this "
                    "model again instead of loading the saved one"
                )


class _Checked:
    """Stands in for a loaded graph in one place that calls it (a region of the split graph, or
    the whole forward) until the first call, whose weights it checks first."""

    def __init__(self, graph: _LoadedGraph, owner: Any, attr: str) -> None:
        self.graph, self.owner, self.attr = graph, owner, attr

    def __call__(self, *args: Any) -> Any:
        self.graph.check_weights(args)
        setattr(self.owner, self.attr, self.graph)
        return self.graph(*args)


def _options(saved: dict[str, Any]) -> Options:
    """The saved options, with this process's cache directory (``TRT_SUBGRAPH_CACHE_DIR`` or the
    default): the saving machine's directory means nothing here."""
    options = Options(**saved)
    return dataclasses.replace(options, cache_dir=default_cache_dir() if options.cache else None)


class StalePlan(RuntimeError):
    """A cached plan whose artifacts are not all in this process's memory or the caches."""


def _rebuild(
    state: dict[str, Any],
    data: bytes | None,
    *,
    options: Options | None = None,
    cached: bool = False,
) -> CompiledForward:
    """The forward of a plan's `state`; `data`: its serialized bytes (None when `cached`).
    `options`: this process's (default: the saved ones, with this process's cache directory).
    `cached`: the plan comes from the plan cache (`trt_subgraph.plan_cache`), its artifacts named
    by key: raise :class:`StalePlan`, before anything runs, when one is in no cache."""
    from .regions import RegionRunner  # regions builds on this module

    start = time.perf_counter()
    if not isinstance(state, dict) or state.get("format") != PLAN_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise RuntimeError(f"trt_subgraph: saved plan format {found!r}; this release reads format {PLAN_FORMAT}")
    options = options if options is not None else _options(state["options"])
    engine, engine_reason = engines.select(
        state["engine"], torch_executed_ops=options.torch_executed_ops, sparsity=options.sparsity
    )
    if state.get("engine_extras") is not None:  # before any key below is made
        engine.restore_saved_extras(state["engine_extras"])
    engine.start_setup(state["device_types"])  # overlaps unpickling the graphs below; loads wait for it
    store = ArtifactStore(engine, options)
    fake_mode = new_fake_mode()
    groups: dict[str, _Group] = {}
    for name, saved in state["groups"].items():
        sub = CanonicalSubgraph(
            graph_unpickle(saved["gm"], fake_mode), tuple(saved["kinds"]), saved["record"]["fingerprint"]
        )
        rec = saved["record"]
        fields = ("fingerprint", "nodes", "instances", "status", "error", "variant")
        group = groups[name] = _Group(sub, SubgraphRecord(**{k: rec[k] for k in fields}), store)
        if group.record.status != "fallback":
            group.key = make_key(store.key_parts(sub, group.extra))
    restores = [(group, state["groups"][name]) for name, group in groups.items()]
    with engine.loading():  # artifacts load at once where the engine allows it
        if engine.loads_concurrently() and len(restores) > 1:
            with concurrent.futures.ThreadPoolExecutor(
                min(len(restores), 8), thread_name_prefix="trt_subgraph-load"
            ) as threads:
                list(threads.map(lambda job: job[0].restore(job[1]["key"], job[1]["artifact"]), restores))
        else:
            for group, saved in restores:
                group.restore(saved["key"], saved["artifact"])
    missing = [group.sub.fingerprint for group in groups.values() if group.bound is None]
    if cached and missing and engine.persistable:
        raise StalePlan(f"the artifacts of subgraphs {missing} are in no cache")

    graphs = []
    for saved in state["graphs"]:
        gm = graph_unpickle(saved["gm"], fake_mode)
        paths = saved.get("paths", {})  # the module each piece computes (plans saved before 0.2 have none)
        for attr, name in saved["pieces"].items():
            group = groups[name]
            if group.bound is not None:
                piece = PieceRunner(group.sub, group.bound, group.record, module_path=paths.get(attr, ""))
            else:
                first = _FirstBuild(group)
                piece = first.piece = PieceRunner(group.sub, first, group.record, module_path=paths.get(attr, ""))
            setattr(gm, attr, piece)
        pieces = {attr: groups[name] for attr, name in saved["pieces"].items()}
        graphs.append(_LoadedGraph(gm, saved["num_outputs"], saved["disable_amp"], pieces))

    if state["outer"] is None:
        run = _Whole(graphs[0])
    else:
        run = graph_unpickle(state["outer"], fake_mode)
        for attr, (index, single, paths) in state["calls"].items():
            region = RegionRunner(graphs[index], single, paths)
            region.compiled = _Checked(graphs[index], region, "compiled")
            setattr(run, attr, region)

    saved_report = state["report"]
    report = Report(
        engine=engine.name,
        engine_reason=f"{engine_reason}; {'plan from the plan cache' if cached else 'loaded from a saved plan'}",
        block_method=saved_report["block_method"],
        blocks=saved_report["blocks"],
        subgraphs=[group.record for group in groups.values()],
        fallback_ops=saved_report["fallback_ops"],
        torch_executed=saved_report["torch_executed"],
        memory_format=saved_report["memory_format"],
        sparsity=saved_report["sparsity"],
        regions={**saved_report["regions"], **({"plan": "cache hit"} if cached else {"loaded": True})},
    )
    boxed = pipeline.assemble(run, report=report, options=options, **state["assembly"])
    report.compile_s = time.perf_counter() - start
    record(report)

    def forward(*args: Any) -> Any:
        return boxed(list(args))

    forward.cudagraph = getattr(boxed, "cudagraph", None)  # type: ignore[attr-defined]
    payload = functools.partial(_with_artifacts, state, store) if cached else data
    return CompiledForward(forward, engine.name, state["device_types"], saved=payload)


def _with_artifacts(state: dict[str, Any], store: ArtifactStore) -> bytes:
    """The payload of a plan `state` whose groups name their artifacts by key only, with the
    artifacts' bytes (this process's, else the disk or remote cache's) put in."""
    groups = {}
    for name, group in state["groups"].items():
        if group["artifact"] is None and group["record"]["status"] != "fallback":
            rec = SubgraphRecord(fingerprint=group["record"]["fingerprint"], nodes=group["record"]["nodes"])
            group = {**group, "artifact": _artifact_bytes(store, group["key"], rec)}
        groups[name] = group
    extras = state.get("engine_extras") or store.engine.saved_extras(state["device_types"])
    return pickle.dumps({**state, "groups": groups, "engine_extras": extras}, protocol=pickle.HIGHEST_PROTOCOL)


class _Whole:
    """The forward of a loaded whole-graph plan: its one lowered graph, weights checked at the
    first call."""

    def __init__(self, graph: _LoadedGraph) -> None:
        self.call: Callable[..., Any] = _Checked(graph, self, "call")

    def __call__(self, *args: Any) -> Any:
        return self.call(*args)


# ---------------------------------------------------------------------------------------------
# Files


def _environment(gpu: bool) -> dict[str, Any]:
    """What a saved function depends on beyond its plan; a file from another is refused. `gpu`:
    include the GPU's name (for a function that runs on CUDA)."""
    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    environment = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "trt_subgraph": __version__,
        "cuda": torch.version.cuda,
        "triton": triton,
    }
    if gpu:
        environment["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return environment


def save(compiled: Any, path: str | os.PathLike, *, key_file: str | os.PathLike | None = None) -> Path:
    """Write a function compiled ahead of time with the trt_subgraph backend to `path`.

    `compiled`: what ``torch.compile(f, fullgraph=True, backend="trt_subgraph").aot_compile(((model,
    *args), kwargs))`` returned (take the model as an argument of `f`: modules cannot be saved).
    The file holds torch's pickled function with the plan and the engine artifacts inside, in the
    disk cache's entry format, authenticated with `key_file` (default: the cache's key file,
    ``TRT_SUBGRAPH_KEY_FILE``; created on first use). Written atomically; returns the path. Glue
    still building in the background (``background_glue``) is waited for first (at most
    ``trt_subgraph.build.BACKGROUND_WAIT_S``), so that the file holds its engines.

    Raises TypeError when `compiled` is not such a function, RuntimeError when its graph cannot be
    saved (see :mod:`trt_subgraph.saved`), IsADirectoryError when `path` is a directory,
    FileNotFoundError when its directory does not exist.
    """
    forward = aot_compiled_backend_result(compiled)
    if not isinstance(forward, CompiledForward):
        raise TypeError(
            "trt_subgraph.save expects what torch.compile(f, fullgraph=True, backend='trt_subgraph')"
            f".aot_compile(...) returned, got {type(compiled).__name__}"
        )
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"trt_subgraph.save: {path} is a directory; give the path of the file to write")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"trt_subgraph.save: the directory {path.parent} does not exist; create it first")
    wait_for_background_builds()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        compiled.save_compiled_function(str(tmp))
        payload = tmp.read_bytes()
        secret = load_or_create_secret(Path(key_file) if key_file is not None else default_key_file())
        environment = _environment(gpu="cuda" in forward.device_types)
        meta = {"engine": forward.engine, "versions": environment, "info": {"kind": _FILE_KIND}}
        head = encode_head(xxhash.xxh3_128_hexdigest(payload), payload, meta, secret)
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(
    path: str | os.PathLike, model: torch.nn.Module | None = None, *, key_file: str | os.PathLike | None = None
) -> Callable[..., Any]:
    """The function :func:`save` wrote to `path`, ready to call; with `model`, bound to it as
    its first argument (``load(path, model)(x)`` runs ``f(model, x)``).

    Nothing is traced, split or (where the saved artifacts fit this machine) built. Dynamo's
    guards still check each call's arguments against those it was compiled for.

    Raises ValueError, before anything is unpickled, when the file is not such a file (or not a
    regular file), its authentication tag does not verify with `key_file` (default: the cache's
    key file, as for :func:`save`), or it was saved with another Python, torch, trt_subgraph or
    GPU; IsADirectoryError when `path` is a directory; FileNotFoundError when `path` or the key
    file does not exist.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"trt_subgraph.load: {path} is a directory; give the path of a file trt_subgraph.save wrote"
        )
    if path.exists() and not path.is_file():  # a FIFO or device would block or never end
        raise ValueError(
            f"trt_subgraph.load: {path} is not a regular file; give the path of a file trt_subgraph.save wrote"
        )
    key_path = Path(key_file) if key_file is not None else default_key_file()
    try:
        secret = read_secret(key_path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"trt_subgraph.load: key file {key_path} does not exist; a saved function loads only with the key "
            "file it was saved with: copy that file here, or pass key_file= (or set TRT_SUBGRAPH_KEY_FILE)"
        ) from None
    with open(path, "rb") as f:
        try:
            header = read_header(f)
            f.seek(0)
            header, payload = read_entry(f, header["key"], secret)
        except (Damaged, Foreign) as exc:
            raise ValueError(f"trt_subgraph: {path} is not a loadable compiled function: {exc}") from None
    if header["info"].get("kind") != _FILE_KIND:
        raise ValueError(f"trt_subgraph: {path} is a cache entry, not a saved compiled function")
    saved = header["versions"]
    here = _environment(gpu="gpu" in saved)
    different = [
        f"{k}: saved with {saved.get(k)!r}, this process has {here[k]!r}" for k in here if saved.get(k) != here[k]
    ]
    if different:
        raise ValueError(
            f"trt_subgraph: {path} was saved elsewhere and cannot run here ({'; '.join(different)}); compile again"
        )
    from torch.compiler import load_compiled_function

    function = load_compiled_function(io.BytesIO(payload))
    return functools.partial(function, model) if model is not None else function
