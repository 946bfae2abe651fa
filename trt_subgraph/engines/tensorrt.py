"""TensorRT engine: one refittable engine per canonical subgraph, refit with each instance's weights.

Why refit works across blocks. torch_tensorrt names every engine weight after the FX node that
produced it: ``f"[{LAYER}]-[{source_ir}_ops.{target}]-[{get_node_name(node)}] {ROLE}"`` or
``f"{name} CONSTANT"`` (``conversion/converter_utils.py``, ``to_trt_weights``), where
``get_node_name`` is ``<last nn_module_stack path>/<fx node name>`` (same file, L39-56 in 2.11
and 2.13). Its public API gives us no hook to name weights ourselves (``set_weights_name`` would
need the network before the build, inside ``TRTInterpreter.run``). So we make its names canonical
instead: :func:`to_constant_module` turns the canonical subgraph into a module whose weights are
buffers ``w_0..`` and whose graph is identical for every instance, and ``torch.export`` of a flat
GraphModule gives every node the same nn_module_stack path (``''``, the root) and node names
derived from the op sequence. Two instances therefore produce the same lowered graph, the same
engine weight names, and differ only in values (``tests/test_tensorrt_canonical.py`` checks the
exported graphs; ``tests/test_tensorrt_contract.py`` runs the wheels' own ``get_node_name`` on them).

The refit values come from torch_tensorrt's ``construct_refit_mapping`` (2.11 and 2.13, same
signature) on the instance's lowered module, the method torch_tensorrt 2.13 uses for its own refit:
lowering may fold weights (a linear's transpose becomes ``_frozen_param0``), so the engine's weights
are functions of ours and only re-running the lowering on the instance gives their values.

Version range: torch_tensorrt 2.11 (TensorRT 10.15) and 2.13 (TensorRT 11.0). Every torch_tensorrt
function, keyword and settings field used here is listed in ``TORCH_TRT_CONTRACT`` and every
TensorRT name in ``TRT_CONTRACT``; ``tests/test_tensorrt_contract.py`` checks both tables against
the published wheels of both versions and checks that this module uses nothing outside them.
Coding convention that check relies on: torch_tensorrt is always reached through full dotted
paths from ``torch_tensorrt``, TensorRT through ``trt``, and TensorRT objects are held in
variables (or attributes) named ``engine``, ``context``, ``refitter``, ``runtime``, ``ser_config``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import struct
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from .._compat import unset_fake_temporarily, version_counter
from ..fx_utils import copy_graph, output_values
from .base import ACTIVATION, SYMINT, WEIGHT, CanonicalSubgraph, Engine

log = logging.getLogger(__name__)

# Every torch_tensorrt name this module uses. "positional": how many positional arguments we pass;
# "kwargs": keywords we pass (each must be a declared parameter: torch_tensorrt swallows unknown
# keywords through **kwargs, e.g. ``enabled_precisions`` in 2.13); "fields": dataclass or
# NamedTuple fields we set or read.
_SETTINGS_WE_PASS = [
    "device",
    "immutable_weights",
    "sparse_weights",
    "optimization_level",
    "disable_tf32",
    "strip_engine_weights",
    "refit_identical_engine_weights",
]
TORCH_TRT_CONTRACT: dict[str, dict[str, Any]] = {
    "torch_tensorrt.Input.from_tensor": {"positional": 1},
    "torch_tensorrt.dynamo.CompilationSettings": {
        "kwargs": _SETTINGS_WE_PASS,
        "fields": [*_SETTINGS_WE_PASS, "enable_experimental_decompositions", "decompose_attention"],
    },
    "torch_tensorrt.dynamo.utils.to_torch_tensorrt_device": {"positional": 1},
    "torch_tensorrt.dynamo.lowering.pre_export_lowering": {"positional": 2},
    "torch_tensorrt.dynamo.lowering.get_decompositions": {
        "kwargs": ["enable_experimental_decompositions", "decompose_attention"],
    },
    "torch_tensorrt.dynamo.lowering.post_lowering": {"positional": 2},
    "torch_tensorrt.dynamo.conversion.interpret_module_to_result": {
        "positional": 1,
        "kwargs": ["inputs", "settings"],
    },
    "torch_tensorrt.dynamo.conversion._conversion.SerializedInterpreterResult": {
        "fields": ["serialized_engine", "input_names", "output_names"],
    },
    "torch_tensorrt.dynamo._refit.construct_refit_mapping": {
        "positional": 1,
        "kwargs": ["inputs", "settings"],
    },
    "torch_tensorrt.dynamo.conversion.DYNAMO_CONVERTERS": {},
}

# Every TensorRT class and member this module uses, checked against the compiled bindings of
# TensorRT 10.15 and 11.0. BuilderFlag members are set by torch_tensorrt on our behalf
# (immutable_weights=False -> REFIT, sparse_weights -> SPARSE_WEIGHTS, strip_engine_weights ->
# STRIP_PLAN); we rely on them surviving in both versions.
TRT_CONTRACT: dict[str, list[str]] = {
    "Logger": ["WARNING"],
    "Runtime": ["deserialize_cuda_engine"],
    "ICudaEngine": [
        "get_tensor_dtype",
        "create_execution_context",
        "create_serialization_config",
        "serialize_with_config",
    ],
    "IExecutionContext": ["set_input_shape", "get_tensor_shape", "set_tensor_address", "execute_async_v3"],
    "Refitter": ["get_all_weights", "set_named_weights", "get_missing_weights", "refit_cuda_engine"],
    "ISerializationConfig": ["set_flag", "clear_flag"],
    "SerializationFlag": ["EXCLUDE_WEIGHTS", "INCLUDE_REFIT"],
    "Weights": [],
    "TensorLocation": ["HOST", "DEVICE"],
    "DataType": ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8"],
    "BuilderFlag": ["REFIT", "SPARSE_WEIGHTS", "STRIP_PLAN"],
}

_PAYLOAD_MAGIC = b"TRTSUBG1"


def to_constant_module(sub: CanonicalSubgraph, weights: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """The canonical subgraph with its weights as buffers ``w_0..`` (in weight order).

    Activation placeholders keep their canonical names, nodes keep ``n_i`` and only ``val`` meta,
    so every instance of a fingerprint yields the same ``gm.code`` and buffer names.
    """
    positions = sub.weight_positions
    if len(weights) != len(positions):
        raise ValueError(
            f"trt_subgraph: subgraph {sub.fingerprint} has {len(positions)} weight inputs "
            f"(placeholders {positions}), got {len(weights)} weights"
        )
    root = torch.nn.Module()
    buffers: list[str] = []

    def input_node(graph: torch.fx.Graph, node: torch.fx.Node, i: int) -> torch.fx.Node:
        if sub.input_kinds[i] != WEIGHT:
            return graph.placeholder(node.name)
        k = len(buffers)
        buffers.append(f"w_{k}")
        root.register_buffer(buffers[k], _checked_weight(sub, node, k, weights[k]))
        return graph.get_attr(buffers[k])

    graph = copy_graph(sub.gm.graph, input_node, node_name=lambda node, j: node.name)
    graph.lint()
    return torch.fx.GraphModule(root, graph, class_name="CanonicalConstantModule")


def _checked_weight(sub: CanonicalSubgraph, node: torch.fx.Node, k: int, weight: Any) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"trt_subgraph: weight {k} of subgraph {sub.fingerprint} must be a tensor, got {type(weight).__name__}"
        )
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and (tuple(val.shape) != tuple(weight.shape) or val.dtype != weight.dtype):
        raise ValueError(
            f"trt_subgraph: weight {k} of subgraph {sub.fingerprint} must be {val.dtype} "
            f"{tuple(val.shape)}, got {weight.dtype} {tuple(weight.shape)}"
        )
    return weight.detach()


def _weights_key(weights: Sequence[torch.Tensor]) -> tuple:
    """What identifies the values an engine was last refit with: address and in-place version."""
    return tuple((w.data_ptr(), version_counter(w)) for w in weights)


@dataclasses.dataclass
class TensorRTArtifact:
    """A serialized engine plan plus what a runner needs to drive it.

    ``stripped``: the plan holds no weights and must be refit before it runs. ``built_with``: weak
    references to the weights a full plan holds, with their address and version at build time, so
    the instance that owns them skips its first refit (a dead reference means the memory may have
    been reused, so the address proves nothing).
    """

    plan: bytes
    input_names: list[str]
    output_names: list[str]
    sparse: bool
    stripped: bool = False
    built_with: tuple = ()

    @staticmethod
    def record(weights: Sequence[torch.Tensor]) -> tuple:
        return tuple((weakref.ref(w), w.data_ptr(), version_counter(w)) for w in weights)

    def holds(self, weights: Sequence[torch.Tensor]) -> bool:
        """True when the plan's baked weights are exactly these tensors' current values."""
        if self.stripped or len(self.built_with) != len(weights):
            return False
        for (ref, ptr, version), w in zip(self.built_with, weights):
            held = ref()
            if held is None or held.data_ptr() != ptr or (w.data_ptr(), version_counter(w)) != (ptr, version):
                return False
        return True


@functools.cache
def _trt() -> Any:
    import tensorrt as trt

    return trt


@functools.cache
def _logger() -> Any:
    trt = _trt()
    return trt.Logger(trt.Logger.WARNING)


def _can_strip() -> bool:
    """Feature probe: weight-stripped serialization (TensorRT >= 10.0, present in 10.15 and 11)."""
    trt = _trt()
    return hasattr(trt, "SerializationFlag") and hasattr(trt.SerializationFlag, "EXCLUDE_WEIGHTS")


def _deserialize(plan: bytes) -> Any:
    trt = _trt()
    runtime = trt.Runtime(_logger())
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise RuntimeError("TensorRT could not deserialize the engine plan (see the TensorRT log above)")
    return engine


def _serialize(engine: Any, *, strip: bool) -> bytes:
    """Plan bytes; stripped plans exclude refittable weights, full ones stay refittable."""
    trt = _trt()
    ser_config = engine.create_serialization_config()
    if strip:
        ser_config.set_flag(trt.SerializationFlag.EXCLUDE_WEIGHTS)
    else:
        ser_config.clear_flag(trt.SerializationFlag.EXCLUDE_WEIGHTS)
        if hasattr(trt.SerializationFlag, "INCLUDE_REFIT"):  # TensorRT >= 10.14
            ser_config.set_flag(trt.SerializationFlag.INCLUDE_REFIT)
    return bytes(engine.serialize_with_config(ser_config))


def _trt_dtype(dtype: torch.dtype) -> Any:
    trt = _trt()
    table = {
        torch.float32: trt.DataType.FLOAT,
        torch.float16: trt.DataType.HALF,
        torch.bfloat16: trt.DataType.BF16,
        torch.int8: trt.DataType.INT8,
        torch.int32: trt.DataType.INT32,
        torch.int64: trt.DataType.INT64,
        torch.bool: trt.DataType.BOOL,
        torch.uint8: trt.DataType.UINT8,
    }
    if dtype not in table:
        raise TypeError(f"trt_subgraph: TensorRT weights cannot be {dtype}; supported: {sorted(map(str, table))}")
    return table[dtype]


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    for dtype in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.int32,
        torch.int64,
        torch.bool,
        torch.uint8,
    ):
        if _trt_dtype(dtype) == trt_dtype:
            return dtype
    raise TypeError(f"trt_subgraph: TensorRT tensor type {trt_dtype} has no torch equivalent here")


class RefitError(RuntimeError):
    """An engine could not take an instance's weights (missing names or TensorRT refused)."""


class TensorRTEngine(Engine):
    """Builds through torch_tensorrt's conversion API, refits per instance with ``trt.Refitter``."""

    name = "tensorrt"
    persistable = True
    sparse_weights = True

    def __init__(
        self,
        *,
        torch_executed_ops: frozenset[str] = frozenset(),
        sparse: bool = False,
        optimization_level: int | None = None,
    ) -> None:
        super().__init__(torch_executed_ops=torch_executed_ops)
        if not isinstance(sparse, bool):
            raise TypeError(f"trt_subgraph: TensorRT 'sparse' must be a bool, got {sparse!r}")
        if optimization_level is not None and (
            isinstance(optimization_level, bool) or optimization_level not in range(6)
        ):
            raise ValueError(
                f"trt_subgraph: TensorRT optimization_level must be None or 0..5, got {optimization_level!r}"
            )
        self.sparse = sparse
        self.optimization_level = optimization_level

    @classmethod
    def unavailable_reason(cls) -> str | None:
        missing = []
        for module in ("tensorrt", "torch_tensorrt"):
            try:
                __import__(module)
            except Exception as exc:  # a broken install raises more than ImportError
                missing.append(f"{module} does not import ({type(exc).__name__}: {exc})")
        if not torch.cuda.is_available():
            missing.append("no CUDA device")
        return "; ".join(missing) or None

    def weight_variant(self, weight: torch.Tensor) -> str | None:
        """Whether a conv (>= 3-D) or linear (2-D) weight meets TensorRT's 2:4 rule: an engine
        holding one is built with SPARSE_WEIGHTS, and refitting a dense weight into it is wrong."""
        from ..sparse.analysis import SPARSE_DTYPES, analyze_weight

        if not self.sparse or weight.dim() < 2 or weight.dtype not in SPARSE_DTYPES:
            return None
        return "2:4" if analyze_weight(weight, kind="linear" if weight.dim() == 2 else "conv").eligible else "dense"

    def settings(self) -> dict[str, Any]:
        """Engine-shaping settings plus TensorRT/torch_tensorrt versions (the GPU is in the device key)."""
        versions = {}
        for module in ("tensorrt", "torch_tensorrt"):
            try:
                versions[module] = __import__(module).__version__
            except Exception:
                versions[module] = None
        return {
            "engine": self.name,
            "sparse": self.sparse,
            "optimization_level": self.optimization_level,
            "tf32": _tf32(),
            "refit": "REFIT",
            "versions": versions,
        }

    def is_node_supported(self, node: torch.fx.Node) -> bool:
        """Ops torch_tensorrt converts (its registry, validators included) or decomposes first."""
        if not super().is_node_supported(node):
            return False
        tables = _converter_tables()
        if tables is None:
            return False
        registry, decompositions = tables
        if node.target in decompositions:
            return True
        try:
            return node in registry
        except Exception as exc:  # a capability validator that cannot read this node
            log.debug("trt_subgraph: torch_tensorrt validator failed on %s: %s", node.format_node(), exc)
            return False

    # -- build ------------------------------------------------------------------------------

    def _compilation_settings(self, device: torch.device, sparse: bool = False) -> Any:
        import torch_tensorrt

        # No enabled_precisions: TensorRT 11 is strongly typed and torch_tensorrt 2.13 removed it
        # (2.11 defaults to use_explicit_typing=True), so precision follows the graph's dtypes.
        # TF32 follows PyTorch's matmul setting, so fp32 engines compute like the model does.
        return torch_tensorrt.dynamo.CompilationSettings(
            device=torch_tensorrt.dynamo.utils.to_torch_tensorrt_device(device),
            immutable_weights=False,
            sparse_weights=sparse,
            optimization_level=self.optimization_level,
            disable_tf32=not _tf32(),
            strip_engine_weights=False,
            refit_identical_engine_weights=False,
        )

    def _lowered(
        self, sub: CanonicalSubgraph, weights: Sequence[torch.Tensor], settings: Any
    ) -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
        """torch.export of the constant module, then torch_tensorrt's own front end.

        The same steps as ``convert_exported_program_to_serialized_trt_engine`` (2.11 and 2.13),
        used for the build and for every refit so the engine names always match.
        """
        import torch_tensorrt
        import torch_tensorrt.dynamo.lowering

        examples = _example_activations(sub)
        module = to_constant_module(sub, weights)
        exported = torch.export.export(module, tuple(examples), strict=False)
        exported = torch_tensorrt.dynamo.lowering.pre_export_lowering(exported, settings)
        exported = exported.run_decompositions(
            torch_tensorrt.dynamo.lowering.get_decompositions(
                enable_experimental_decompositions=settings.enable_experimental_decompositions,
                decompose_attention=settings.decompose_attention,
            )
        )
        gm = torch_tensorrt.dynamo.lowering.post_lowering(exported.module(), settings)
        return gm, examples

    def build(self, sub: CanonicalSubgraph, weights: list[torch.Tensor]) -> TensorRTArtifact:
        """Build the engine for the first instance (refittable; sparse where a layer is 2:4)."""
        import torch_tensorrt
        import torch_tensorrt.dynamo.conversion

        _check_outputs(sub)
        with unset_fake_temporarily():
            # SPARSE_WEIGHTS is per engine: set it only where a layer can use it.
            sparse = any(self.weight_variant(w) == "2:4" for w in weights)
            settings = self._compilation_settings(_device_of(sub), sparse)
            gm, examples = self._lowered(sub, weights, settings)
            result = torch_tensorrt.dynamo.conversion.interpret_module_to_result(
                gm,
                inputs=[torch_tensorrt.Input.from_tensor(x) for x in examples],
                settings=settings,
            )
        return TensorRTArtifact(
            plan=bytes(result.serialized_engine),
            input_names=list(result.input_names),
            output_names=list(result.output_names),
            sparse=sparse,
            built_with=TensorRTArtifact.record(weights),
        )

    def refit_mapping(self, sub: CanonicalSubgraph, weights: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Engine weight name -> value for one instance (names equal for every instance)."""
        import torch_tensorrt
        import torch_tensorrt.dynamo._refit

        with unset_fake_temporarily():
            settings = self._compilation_settings(_device_of(sub))
            gm, examples = self._lowered(sub, weights, settings)
            return dict(
                torch_tensorrt.dynamo._refit.construct_refit_mapping(
                    gm,
                    inputs=[torch_tensorrt.Input.from_tensor(x) for x in examples],
                    settings=settings,
                )
            )

    # -- persistence ------------------------------------------------------------------------

    def serialize(self, artifact: TensorRTArtifact) -> bytes:
        """Weight-stripped plan where TensorRT supports it (refit on load), else the full plan."""
        plan, stripped = artifact.plan, artifact.stripped
        if not stripped and _can_strip():
            engine = _deserialize(artifact.plan)
            plan, stripped = _serialize(engine, strip=True), True
        header = json.dumps(
            {
                "input_names": artifact.input_names,
                "output_names": artifact.output_names,
                "sparse": artifact.sparse,
                "stripped": stripped,
            }
        ).encode()
        return _PAYLOAD_MAGIC + struct.pack("<I", len(header)) + header + plan

    def deserialize(self, payload: bytes, sub: CanonicalSubgraph) -> TensorRTArtifact:
        if not payload.startswith(_PAYLOAD_MAGIC) or len(payload) < len(_PAYLOAD_MAGIC) + 4:
            raise ValueError("trt_subgraph: not a TensorRT artifact payload (bad magic)")
        start = len(_PAYLOAD_MAGIC) + 4
        (size,) = struct.unpack("<I", payload[len(_PAYLOAD_MAGIC) : start])
        header = json.loads(payload[start : start + size])
        return TensorRTArtifact(
            plan=payload[start + size :],
            input_names=header["input_names"],
            output_names=header["output_names"],
            sparse=header["sparse"],
            stripped=header["stripped"],
        )

    def bind(self, artifact: TensorRTArtifact, sub: CanonicalSubgraph) -> TensorRTRunner:
        return TensorRTRunner(self, artifact, sub)


class TensorRTRunner:
    """One instance: its own engine copy, refit whenever its weights' address or version changes.

    ``refit_count``, ``rebuilt`` and ``rebuild_reason`` say what happened: a refit that fails
    (names missing, TensorRT refusing) rebuilds an engine from this instance's weights instead.
    """

    def __init__(self, owner: TensorRTEngine, artifact: TensorRTArtifact, sub: CanonicalSubgraph) -> None:
        self.owner = owner
        self.sub = sub
        self.artifact = artifact
        self.sparse = artifact.sparse
        self.engine = _deserialize(artifact.plan)
        self.context: Any = None
        self.weight_positions = sub.weight_positions
        self.activation_positions = [i for i, kind in enumerate(sub.input_kinds) if kind == ACTIVATION]
        self.refit_key: tuple | None = None
        self.refit_count = 0
        self.rebuilt = False
        self.rebuild_reason: str | None = None

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights = [inputs[i] for i in self.weight_positions]
        key = _weights_key(weights)
        if key != self.refit_key:
            if self.refit_key is not None or not self.artifact.holds(weights):
                self._take_weights(weights)
            self.refit_key = key
        return self._execute([inputs[i] for i in self.activation_positions])

    def _take_weights(self, weights: list[torch.Tensor]) -> None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("trt_subgraph: TensorRT weights changed during CUDA graph capture")
        try:
            self._refit(weights)
        except Exception as exc:
            log.warning(
                "trt_subgraph: refit of subgraph %s failed (%s: %s); rebuilding this instance",
                self.sub.fingerprint,
                type(exc).__name__,
                exc,
            )
            self.artifact = self.owner.build(self.sub, weights)
            self.engine = _deserialize(self.artifact.plan)
            self.context = None
            self.rebuilt, self.rebuild_reason = True, f"{type(exc).__name__}: {exc}"

    def _refit(self, weights: list[torch.Tensor]) -> None:
        trt = _trt()
        mapping = self.owner.refit_mapping(self.sub, weights)
        torch.cuda.current_stream().synchronize()  # no enqueued run may read the old weights
        refitter = trt.Refitter(self.engine, _logger())
        names = list(refitter.get_all_weights())
        unknown = [name for name in names if name not in mapping]
        if unknown:
            raise RefitError(f"engine weights without a value for this instance: {unknown[:5]}")
        held = []  # TensorRT reads the host memory during refit_cuda_engine
        for name in names:
            value = mapping[name].detach().contiguous()
            held.append(value)
            location = trt.TensorLocation.DEVICE if value.is_cuda else trt.TensorLocation.HOST
            refitter.set_named_weights(
                name, trt.Weights(_trt_dtype(value.dtype), value.data_ptr(), value.numel()), location
            )
        missing = list(refitter.get_missing_weights())
        if missing:
            raise RefitError(f"TensorRT reports weights still missing: {missing[:5]}")
        if not refitter.refit_cuda_engine():
            raise RefitError("TensorRT refused the refit (see the TensorRT log above)")
        self.refit_count += 1

    def _execute(self, activations: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        engine = self.engine
        if self.context is None:
            self.context = engine.create_execution_context()
        context = self.context
        device = activations[0].device if activations else torch.device("cuda", torch.cuda.current_device())
        kept = []
        for name, value in zip(self.artifact.input_names, activations):
            value = value.to(_torch_dtype(engine.get_tensor_dtype(name))).contiguous()
            kept.append(value)
            context.set_input_shape(name, tuple(value.shape))
            context.set_tensor_address(name, value.data_ptr())
        outputs = []
        for name in self.artifact.output_names:
            out = torch.empty(
                tuple(context.get_tensor_shape(name)), dtype=_torch_dtype(engine.get_tensor_dtype(name)), device=device
            )
            outputs.append(out)
            context.set_tensor_address(name, out.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(device).cuda_stream):
            raise RuntimeError(f"trt_subgraph: TensorRT failed to run subgraph {self.sub.fingerprint}")
        return tuple(outputs)


def _tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _device_of(sub: CanonicalSubgraph) -> torch.device:
    devices = {v.device for v in sub.example_inputs if isinstance(v, torch.Tensor)}
    cuda = [d for d in devices if d.type == "cuda"]
    if len(devices) != 1 or not cuda:
        raise ValueError(
            f"trt_subgraph: TensorRT needs every input of subgraph {sub.fingerprint} on one "
            f"CUDA device, found {sorted(map(str, devices))}"
        )
    return cuda[0]


def _example_activations(sub: CanonicalSubgraph) -> list[torch.Tensor]:
    """Real zero tensors shaped like the activation placeholders (static shapes only)."""
    examples = []
    for kind, val in zip(sub.input_kinds, sub.example_inputs):
        if kind == SYMINT or (isinstance(val, torch.Tensor) and not all(isinstance(s, int) for s in val.shape)):
            raise ValueError(
                f"trt_subgraph: the TensorRT engine builds static shapes only; subgraph "
                f"{sub.fingerprint} has symbolic sizes"
            )
        if kind == ACTIVATION:
            examples.append(torch.zeros(tuple(val.shape), dtype=val.dtype, device=val.device))
    return examples


def _check_outputs(sub: CanonicalSubgraph) -> None:
    for value in output_values(sub.gm):
        if not isinstance(value, torch.fx.Node) or not isinstance(value.meta.get("val"), torch.Tensor):
            raise ValueError(
                f"trt_subgraph: TensorRT engines return tensors only; subgraph {sub.fingerprint} returns {value!r}"
            )
        if value.op == "placeholder":
            raise ValueError(
                f"trt_subgraph: subgraph {sub.fingerprint} returns its input {value.name} "
                "unchanged, which a TensorRT engine cannot alias"
            )


@functools.cache
def _converter_tables() -> tuple[Any, Any] | None:
    """torch_tensorrt's converter registry and decomposition table, or None when it does not import."""
    try:
        import torch_tensorrt
        import torch_tensorrt.dynamo.conversion
        import torch_tensorrt.dynamo.lowering
    except Exception as exc:
        log.debug("trt_subgraph: torch_tensorrt unavailable for is_node_supported: %s", exc)
        return None
    return (
        torch_tensorrt.dynamo.conversion.DYNAMO_CONVERTERS,
        torch_tensorrt.dynamo.lowering.get_decompositions(
            enable_experimental_decompositions=False, decompose_attention=False
        ),
    )


__all__ = [
    "TORCH_TRT_CONTRACT",
    "TRT_CONTRACT",
    "TensorRTArtifact",
    "TensorRTEngine",
    "TensorRTRunner",
    "to_constant_module",
]
