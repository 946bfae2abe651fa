"""Build one TensorRT engine per exported subgraph and refit it with each instance's weights.

A standalone script: ``trt-subgraph export --onnx DIR`` copies it into DIR as ``trt_refit.py``,
and ``index.json`` there lists the commands to run, per unique subgraph::

    python trt_refit.py build <fingerprint>.onnx <fingerprint>.plan
    python trt_refit.py refit <fingerprint>.plan <fingerprint>.onnx <fingerprint>.<i>.safetensors <fingerprint>.<i>.plan

``build`` parses the ONNX file (the first instance's weights) into a strongly typed network and
builds a refittable engine (``BuilderFlag.REFIT``). ``refit`` puts instance ``i``'s weights (a
safetensors file keyed by the ONNX initializer names ``w_0``, ``w_1``, ...) into the ONNX model,
refits a copy of the engine from it with TensorRT's ONNX refitter (``OnnxParserRefitter``, which
transforms weights as the parser did at build time) and writes the refitted engine.

Needs ``tensorrt`` (10.15 or 11; every TensorRT name used here is checked against those
versions' Python bindings), ``onnx`` and ``safetensors``, and a CUDA GPU for TensorRT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx
import safetensors

# safetensors dtype -> ONNX element type, for the dtypes a torch weight can have here.
_ONNX_TYPES = {
    "F64": onnx.TensorProto.DOUBLE,
    "F32": onnx.TensorProto.FLOAT,
    "F16": onnx.TensorProto.FLOAT16,
    "BF16": onnx.TensorProto.BFLOAT16,
    "I64": onnx.TensorProto.INT64,
    "I32": onnx.TensorProto.INT32,
    "I16": onnx.TensorProto.INT16,
    "I8": onnx.TensorProto.INT8,
    "U8": onnx.TensorProto.UINT8,
    "BOOL": onnx.TensorProto.BOOL,
}
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def instance_model(onnx_path: str | Path, weights_path: str | Path) -> onnx.ModelProto:
    """The ONNX model at `onnx_path` with its initializers replaced by the tensors of the same
    names in the safetensors file `weights_path` (raw bytes, so every dtype is kept exactly).

    Raises ValueError when a tensor of the file is not an initializer of the model, or differs
    from it in shape or dtype.
    """
    model = onnx.load(str(onnx_path))
    tensors = dict(safetensors.deserialize(Path(weights_path).read_bytes()))
    initializers = {init.name: init for init in model.graph.initializer}
    for name, spec in tensors.items():
        init = initializers.get(name)
        if init is None:
            raise ValueError(f"{weights_path}: tensor {name!r} is not an initializer of {onnx_path}")
        if list(init.dims) != list(spec["shape"]) or _ONNX_TYPES.get(spec["dtype"]) != init.data_type:
            raise ValueError(
                f"{weights_path}: tensor {name!r} is {spec['dtype']} {spec['shape']}, the initializer in "
                f"{onnx_path} is {onnx.TensorProto.DataType.Name(init.data_type)} {list(init.dims)}"
            )
        for field in _TYPED_FIELDS:
            init.ClearField(field)
        init.raw_data = bytes(spec["data"])
    return model


def build(onnx_path: str, plan_path: str) -> None:
    """Build a refittable engine from the ONNX file and write its plan."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SystemExit(f"TensorRT could not parse {onnx_path}:\n{errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.REFIT)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SystemExit(f"TensorRT could not build an engine from {onnx_path}")
    Path(plan_path).write_bytes(bytes(plan))


def refit(plan_path: str, onnx_path: str, weights_path: str, out_path: str) -> None:
    """Refit the engine in `plan_path` with the weights in `weights_path`; write it to `out_path`."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise SystemExit(f"TensorRT could not load the engine {plan_path}")
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    model = instance_model(onnx_path, weights_path)
    if not parser_refitter.refit_from_bytes(model.SerializeToString()):
        errors = "\n".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
        raise SystemExit(f"TensorRT could not refit {plan_path} from {weights_path}:\n{errors}")
    if not refitter.refit_cuda_engine():
        raise SystemExit(f"TensorRT could not refit {plan_path}: missing weights {refitter.get_missing_weights()}")
    Path(out_path).write_bytes(bytes(engine.serialize()))


def parser() -> argparse.ArgumentParser:
    """The command line (``build`` and ``refit``), without importing TensorRT."""
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = cli.add_subparsers(dest="command", required=True)
    p = commands.add_parser("build", help="build a refittable engine from an exported ONNX file")
    p.add_argument("onnx")
    p.add_argument("plan")
    p = commands.add_parser("refit", help="refit a copy of an engine with one instance's weights")
    p.add_argument("plan")
    p.add_argument("onnx")
    p.add_argument("weights", help="the instance's .safetensors file")
    p.add_argument("out", help="where to write the refitted engine")
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "build":
        build(args.onnx, args.plan)
    else:
        refit(args.plan, args.onnx, args.weights, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
