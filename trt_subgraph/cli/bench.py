"""``trt-subgraph bench`` / ``python -m trt_subgraph.bench``: benchmark repeated-block models.

Importing this module is cheap (argparse only): torch and the runner are imported when the
command runs.
"""

from __future__ import annotations

import argparse
import errno
import shlex
import sys
from pathlib import Path
from typing import Any

from . import HelpFormatter, add_command, make_writable_folder

DESCRIPTION = """\
Benchmark compile time, latency, memory and accuracy of torch.compile backends on
repeated-block models, one fresh process per case."""

EPILOG = """\
examples:
  %(prog)s                                   # CPU: small encoder, depths 2,4, eager/inductor/trt_subgraph
  %(prog)s --models encoder --depths 4,8,16,32 --backends inductor,trt_subgraph --device cuda --out bench
  %(prog)s --model mypkg.models:make --backends eager,inductor   # factory(**kwargs) -> (model, inputs)
  %(prog)s --models encoder,decoder --batches 1,2,3,4,8,16,5 --backends reduce-overhead,trt_subgraph --device cuda

backends: eager, inductor, reduce-overhead, regional (each repeated block compiled alone with
inductor), trt_subgraph, torch_tensorrt (if installed), compile:<name> (any torch.compile backend).

exit status: 0 when at least one case ran (a failed case is a row with its error), 1 when every
case failed, 2 on bad arguments.
"""


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _value(s: str) -> Any:
    if s.startswith("["):
        return _list_value(s)
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def _list_value(s: str) -> list[Any]:
    """'[1, 2,4]' -> [1, 2, 4]: a flat list of values, '[]' empty."""
    inner = s[1:-1]
    if not s.endswith("]") or "[" in inner or "]" in inner:
        raise ValueError(f"{s!r} is not a list of values: write key=[v1,v2] (no nested lists)")
    if not inner.strip():
        return []
    items = [item.strip() for item in inner.split(",")]
    if not all(items):
        raise ValueError(f"{s!r} has an empty item: write key=[v1,v2]")
    return [_value(item) for item in items]


def parse_kv(s: str) -> dict[str, Any]:
    """'engine=inductor,cudagraphs=false,cudagraph_sizes=[1,2,4]' -> {'engine': 'inductor',
    'cudagraphs': False, 'cudagraph_sizes': [1, 2, 4]}: true/false/none, ints and floats are
    converted; a value that starts with '[' is a flat list of such values (its commas belong to
    it). Raises ValueError for an item that is not key=value, a key given twice or holding a
    bracket, and a list that does not close, nests or has an empty item."""
    out: dict[str, Any] = {}
    for item in _items(s):
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected key=value pairs separated by commas, got {item!r} in {s!r}")
        if "[" in key or "]" in key:
            raise ValueError(f"{key!r} is not a key: brackets belong to list values, written key=[v1,v2]")
        if key in out:
            raise ValueError(f"{key!r} is given twice in {s!r}")
        out[key] = _value(val.strip())
    return out


def _items(s: str) -> list[str]:
    """`s` split at its commas, except those inside a list value (key=[v1,v2]); empty items dropped."""
    items: list[str] = []
    open_list: str | None = None
    for part in s.split(","):
        if open_list is not None:
            open_list += "," + part
            if part.strip().endswith("]"):
                items.append(open_list.strip())
                open_list = None
            continue
        value = part.partition("=")[2].strip()
        if value.startswith("[") and not value.endswith("]"):
            open_list = part
        elif part.strip():
            items.append(part.strip())
    if open_list is not None:
        raise ValueError(f"the list in {open_list.strip()!r} does not close: write key=[v1,v2]")
    return items


def _positive_ints(s: str, flag: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3] for --depths, --batches and --seqs (order kept: it is the call order)."""
    try:
        values = [int(x) for x in s.split(",")]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated positive ints, got {s!r}") from None
    if min(values) < 1:
        raise ValueError(f"{flag} must be comma-separated positive ints, got {s!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench options (shared by the subcommand and `python -m trt_subgraph.bench`)."""
    p.add_argument(
        "--models",
        help="built-in models, comma-separated: encoder, vit, resnet, decoder, "
        "mlp, efficientnet, mobilenetv3, convnext (default: encoder, unless --model is given)",
    )
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="PKG.MODULE:FACTORY",
        help="your own model: factory(**kwargs) returns (model, example_inputs); "
        "kwargs are the sizes you set (depth, width, batch, seq, image) and --model-kwargs; "
        "the module is looked up on the import path and in the current directory; repeatable "
        "(default: none)",
    )
    p.add_argument(
        "--model-kwargs",
        default="",
        metavar="K=V,...",
        help="extra keyword arguments for the models (e.g. heads=4,norm_first=false) (default: none)",
    )
    p.add_argument("--backends", default="eager,inductor,trt_subgraph", help="comma-separated (default: %(default)s)")
    p.add_argument(
        "--depths",
        help="blocks to sweep, comma-separated (default: 2,4 on CPU; the model's own "
        "depth on CUDA). resnet, efficientnet: blocks per stage; mobilenetv3: length of each run of "
        "identical blocks",
    )
    for name, what in (
        ("width", "model width (resnet: base channels; efficientnet, mobilenetv3: stem channels)"),
        ("batch", "batch size"),
        ("seq", "sequence length (encoder, decoder)"),
        ("image", "image size (vit, resnet, efficientnet, mobilenetv3)"),
    ):
        p.add_argument(
            f"--{name}", type=int, help=f"{what} (default: small on CPU, the model's GPU benchmark size on CUDA)"
        )
    p.add_argument(
        "--batches",
        metavar="B,B,...",
        help="dynamic shapes: call each case's one compiled model at these batch sizes, in this order "
        "(first and second call per size, then latency per size once all were seen); rows per size; "
        "excludes --batch and --seqs (default: one batch size)",
    )
    p.add_argument(
        "--seqs",
        metavar="S,S,...",
        help="dynamic shapes: as --batches, over sequence lengths (encoder, decoder, --model factories); "
        "the model is built for the longest; excludes --seq and --batches (default: one length)",
    )
    p.add_argument(
        "--dynamic",
        action="store_true",
        help="torch.compile(..., dynamic=True) for every compiling backend (default: torch.compile's "
        "default: static first, automatic dynamic from the first recompile)",
    )
    p.add_argument(
        "--dtype", choices=("float16", "bfloat16", "float32"), help="default: float16 on CUDA, float32 on CPU"
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--repeats", type=int, help="timed calls (default: 100 on CUDA, 20 on CPU)")
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed calls after the first two, which are timed on their own (default: 10 on CUDA, 3 on CPU)",
    )
    p.add_argument("--sparse", action="store_true", help="prune conv/linear weights to 2:4 first")
    p.add_argument(
        "--trt-options",
        default="",
        metavar="K=V,...",
        help="options for the trt_subgraph backend, e.g. engine=inductor,sparsity=auto; a list in brackets: "
        "cudagraph_sizes=[1,2,4,8] (default: none)",
    )
    p.add_argument(
        "--torch-tensorrt-options",
        default="",
        metavar="K=V,...",
        help="extra options for the torch_tensorrt backend (default: none)",
    )
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="also run each trt_subgraph case again in a new process sharing its disk cache",
    )
    p.add_argument(
        "--saved",
        action="store_true",
        help="also run each trt_subgraph case as a saved function: a process compiles it ahead of "
        "time and saves it (trt_subgraph.save), a new process with every cache empty loads it and is "
        "timed (torch >= 2.9; one input size)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="fresh processes per case, round by round; the row is the run with the median first "
        "call and shows the range of all (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        help="write results.json, results.md, PNG plots (and logs/ of "
        "failed cases) here (default: print the table only)",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="merge into the results already in --out (same device, dtype and timing settings); "
        "new rows replace old rows of the same model, depth, backend and variant",
    )
    p.add_argument("--title", default="trt-subgraph bench", help="heading of results.md (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per case (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs (default: %(default)s)")
    p.add_argument(
        "--bytecode",
        choices=("auto", "off"),
        default="auto",
        help="auto: if the case processes would find no Python bytecode for torch (packages shipped "
        "without .pyc files, PYTHONDONTWRITEBYTECODE=1), compile it once before the first case into "
        "~/.cache/trt_subgraph-bench/pycache (or $PYTHONPYCACHEPREFIX) and pass PYTHONPYCACHEPREFIX to "
        "every case; off: never (default: %(default)s)",
    )


def config_from_args(args: argparse.Namespace, command: str = ""):
    """Resolve device-dependent defaults and validate; returns a runner.Config."""
    import torch

    from trt_subgraph.bench.runner import Config

    device = args.device if args.device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    models = _csv(args.models) if args.models is not None else ([] if args.model else ["encoder"])
    return Config(
        models=models + list(args.model),
        backends=_csv(args.backends),
        device=device,
        dtype=args.dtype or ("float16" if cuda else "float32"),
        depths=_positive_ints(args.depths, "--depths") if args.depths is not None else None,
        width=args.width,
        batch=args.batch,
        seq=args.seq,
        image=args.image,
        batches=_positive_ints(args.batches, "--batches") if args.batches is not None else None,
        seqs=_positive_ints(args.seqs, "--seqs") if args.seqs is not None else None,
        dynamic=args.dynamic,
        model_kwargs=parse_kv(args.model_kwargs),
        repeats=args.repeats if args.repeats is not None else (100 if cuda else 20),
        warmup=args.warmup if args.warmup is not None else (10 if cuda else 3),
        sparse=args.sparse,
        trt_options=parse_kv(args.trt_options),
        tt_options=parse_kv(args.torch_tensorrt_options),
        warm_cache=args.warm_cache,
        saved=args.saved,
        runs=args.runs,
        timeout=args.timeout,
        seed=args.seed,
        bytecode=args.bytecode,
        out=args.out,
        append=args.append,
        title=args.title,
        command=command,
    )


def _check_gpu(device: str) -> None:
    """ValueError where `device` (``cuda`` or ``cuda:N``) names no GPU this torch sees: every
    case would fail the same way."""
    import torch

    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")


def run(args: argparse.Namespace) -> int:
    """Run the sweep, print the table; 2 on bad arguments, 1 when every case failed, else 0
    (a failed case is a row: one backend that is not installed does not fail a sweep)."""
    command = getattr(args, "bench_command", None) or f"trt-subgraph {shlex.join(sys.argv[1:])}"
    try:
        cfg = config_from_args(args, command)
        _check_gpu(cfg.device)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from trt_subgraph.bench import output
    from trt_subgraph.bench.runner import run_sweep, stop_signals_as_exit

    if cfg.append and cfg.out is None:
        print("error: --append needs --out", file=sys.stderr)
        return 2
    if cfg.out is not None:
        try:
            make_writable_folder(cfg.out)
            if (cfg.out / "results.json").is_dir():
                raise IsADirectoryError(errno.EISDIR, "results.json there is a folder")
        except OSError as e:
            print(f"error: --out {cfg.out}: cannot write there ({e.strerror or e})", file=sys.stderr)
            return 2
    try:
        with stop_signals_as_exit():
            data = run_sweep(cfg)
    except ValueError as e:  # --append onto incompatible results
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(output.terminal_table(data))
    if data["results"] and not any(row.get("status") == "ok" for row in data["results"]):
        print("error: every case failed (the rows above give each error)", file=sys.stderr)
        return 1
    return 0


def add_cli(subparsers) -> None:
    """Register `bench` on the `trt-subgraph` parser."""
    p = add_command(
        subparsers,
        "bench",
        help="benchmark repeated-block models across backends",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trt_subgraph.bench", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    p.set_defaults(bench_command=f"python -m trt_subgraph.bench {shlex.join(argv)}".strip())
    return run(p.parse_args(argv))
