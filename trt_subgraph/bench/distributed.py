"""Multi-process benchmark: the decoder tensor-parallel over the ranks, or one replica per rank.

Run ``python -m trt_subgraph.bench.distributed --nproc 2 --out DIR`` (driver): every case
(mode x backend) is a fresh ``torchrun --standalone --nproc-per-node N`` launch with empty
compiler caches of its own, so first-call times are cold; the driver writes
``distributed.json`` and ``distributed.md`` to ``--out``. ``--device cpu --tiny`` runs it with
gloo on a CPU at toy sizes (what the tests do).

Modes:

* ``tp``: the benchmark decoder (`trt_subgraph.bench.models.Decoder`, built from the same seed
  on every rank) with each block's q/k/v and MLP gate/up projections column-parallel and its
  o/down projections row-parallel, each row-parallel output summed over the ranks by a
  functional all-reduce (``_c10d_functional.all_reduce``, which Dynamo keeps in the graph);
  embedding, norms and lm head are replicated. Heads must divide by the ranks.
* ``dp``: the whole decoder on every rank (data-parallel replicas compiling the same graph).

Backends (``--backends``): ``trt_subgraph`` (ranks split the builds, option
``rank_split_builds="auto"``), ``trt_subgraph-alone`` (every rank builds alone),
``trt_subgraph-remote`` (every rank alone with the remote cache of ``--remote-cache``: the
ranks share through it), ``inductor``, ``reduce-overhead``, ``eager``. Each rank has its own
trt_subgraph disk cache and inductor/Triton caches, so nothing is shared between ranks but what
the backend shares.

Measured per case: the first call (from the torch.compile call through compile and run, after a
barrier; the slowest rank's time), trt_subgraph's compile time and builds per rank, the steady
latency (median of ``--iters`` calls after ``--warmup``, timed with CUDA events on a GPU, once
trt_subgraph's glue built in the background is in: ``background_wait_s``), and the outputs: the largest
difference between ranks, and the error against the unsharded decoder run in fp32 in one
process (max abs error, and that over the reference's largest magnitude).

With ``--isolate-gpus`` (the default on CUDA) each rank sees only its own GPU
(``CUDA_VISIBLE_DEVICES``), so every rank compiles for ``cuda:0`` and ranks can share
artifacts: an inductor artifact is built for one device index (see `trt_subgraph.ranks`).
NCCL may then take a slower path between the GPUs; compare steady latencies within one run.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trt_subgraph._compat import functional_all_reduce, raise_recompile_limit
from trt_subgraph.bench.models import DTYPES, DecoderBlock, _rotate_half, build
from trt_subgraph.bench.runner import run_in_own_session
from trt_subgraph.cache.remote import check_url
from trt_subgraph.workers import with_import_path

MODES = ("tp", "dp")
BACKENDS = ("trt_subgraph", "trt_subgraph-alone", "trt_subgraph-remote", "inductor", "reduce-overhead", "eager")
# The largest error against the fp32 reference that counts as equal, over the reference's largest
# magnitude: fp32 differs only in summation order (sharded matmuls, all-reduce), fp16/bf16 by
# their rounding over a few blocks (10 and 7 mantissa bits).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
TINY = {"depth": 2, "width": 32, "heads": 4, "batch": 2, "seq": 8}
MARKER = "@@trt_subgraph.bench.distributed@@ "


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trt_subgraph.bench.distributed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a case's JSON spec: run as one torchrun rank
    parser.add_argument("--out", type=Path, help="directory for distributed.json and distributed.md")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per case (default 2)")
    parser.add_argument("--modes", default="tp,dp", help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--backends", default=",".join(b for b in BACKENDS if b != "trt_subgraph-remote"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default=None, choices=tuple(TOLERANCE), help="default float16 on cuda, else float32")
    parser.add_argument("--tiny", action="store_true", help=f"toy sizes {TINY}")
    for name in ("depth", "width", "heads", "batch", "seq"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--engine", default="auto", help="trt_subgraph's engine option (default auto)")
    parser.add_argument("--remote-cache", default=None, help="remote cache URL for trt_subgraph-remote")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per case")
    parser.add_argument("--isolate-gpus", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return _worker(json.loads(args.worker))
    if args.out is None:
        parser.error("--out is required")
    modes = _choices(parser, "--modes", args.modes, MODES)
    backends = _choices(parser, "--backends", args.backends, BACKENDS)
    if "trt_subgraph-remote" in backends and not args.remote_cache:
        parser.error("backend trt_subgraph-remote needs --remote-cache URL (such as redis://host:6379)")
    if args.remote_cache:
        try:
            check_url(args.remote_cache)
        except ValueError as exc:
            parser.error(f"--remote-cache: {exc}")
    if args.nproc < 1 or args.iters < 1 or args.warmup < 0 or not 0 < args.timeout < float("inf"):
        parser.error("--nproc and --iters must be >= 1, --warmup >= 0, --timeout a number of seconds > 0")
    sizes = dict(TINY) if args.tiny else {}
    sizes.update({k: getattr(args, k) for k in TINY if getattr(args, k) is not None})
    if "tp" in modes:  # the ranks would each fail on it: say so before launching them
        # heads and MLP hidden size follow from width and heads alone: one small block shows them
        probe = {**sizes, "depth": 1, "vocab": 8, "batch": 1, "seq": 2}
        try:
            check_tensor_parallel(build("decoder", device="meta", **probe)[0], args.nproc)
        except ValueError as exc:
            parser.error(f"{exc} (set --heads and --width so that they do)")
    base = {
        "device": args.device,
        "dtype": args.dtype or ("float16" if args.device == "cuda" else "float32"),
        "sizes": sizes,
        "engine": args.engine,
        "remote_cache": args.remote_cache,
        "iters": args.iters,
        "warmup": args.warmup,
        "isolate": args.isolate_gpus and args.device == "cuda",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in modes:
        for backend in backends:
            row = run_case({**base, "mode": mode, "backend": backend}, args.nproc, args.timeout, args.out)
            print(_line(row), flush=True)
            rows.append(row)
            result = {"meta": _meta(base, args.nproc), "rows": rows}  # after every case: a stopped run keeps its rows
            (args.out / "distributed.json").write_text(json.dumps(result, indent=2))
            (args.out / "distributed.md").write_text(markdown(result))
    print(f"wrote {args.out / 'distributed.json'} and {args.out / 'distributed.md'}")
    return 0 if all(row.get("error") is None for row in rows) else 1


def _choices(parser: argparse.ArgumentParser, flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in chosen if x not in allowed]
    if bad or not chosen:
        parser.error(f"{flag}: unknown {bad or text!r}; allowed: {', '.join(allowed)}")
    return chosen


def run_case(spec: dict[str, Any], nproc: int, timeout: float, log_dir: Path) -> dict[str, Any]:
    """One case in a fresh ``torchrun`` launch of `nproc` ranks with empty caches; its row
    (with ``error`` set where it failed or timed out). A failed case's whole output goes to
    ``<mode>-<backend>.log`` in `log_dir`; a rank stopped at the `timeout` (seconds) writes every
    thread's stack there as it stops (SIGTERM, see `trt_subgraph.bench.runner.run_in_own_session`)."""
    row: dict[str, Any] = {"mode": spec["mode"], "backend": spec["backend"], "ranks": nproc}
    tmp = tempfile.mkdtemp(prefix="trt_subgraph_dist_")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "trt_subgraph.bench.distributed",
        "--worker",
        json.dumps({**spec, "caches": tmp}),
    ]
    # The ranks run ``python -m``, which puts the working directory first on the import path:
    # they start in the empty temporary directory and import this trt_subgraph
    # (`with_import_path`), whatever the caller's working directory holds.
    env = with_import_path(dict(os.environ))
    try:
        returncode, stdout, stderr, timed_out, seconds = run_in_own_session(cmd, timeout=timeout, env=env, cwd=tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    row["wall_s"] = round(seconds, 3)
    found = [json.loads(line[len(MARKER) :]) for line in stdout.splitlines() if line.startswith(MARKER)]
    if found:
        row.update(found[-1])
    tail = " | ".join((stderr or stdout).strip().splitlines()[-20:])
    if timed_out or returncode != 0 or not found:
        log = log_dir / f"{spec['mode']}-{spec['backend']}.log"
        log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    if timed_out:
        row["error"] = f"timed out after {timeout:.0f} s: {tail}"
    elif returncode != 0 or not found:
        row["error"] = f"exit {returncode}: {tail}"
    return row


def _meta(base: dict[str, Any], nproc: int) -> dict[str, Any]:
    import platform

    from trt_subgraph import __version__
    from trt_subgraph.bench._case import machine_name

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_name(base["device"]),
        "gpus": torch.cuda.device_count() if base["device"] == "cuda" else 0,
        "ranks": nproc,
        "torch": torch.__version__,
        "trt_subgraph": __version__,
        "python": platform.python_version(),
        **{k: base[k] for k in ("device", "dtype", "sizes", "engine", "iters", "warmup", "isolate")},
    }


# --- one rank ---------------------------------------------------------------------------------


def _worker(spec: dict[str, Any]) -> int:
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)  # a stopped rank shows where it was
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    caches = os.path.join(spec["caches"], f"rank{rank}")  # nothing shared between ranks but by the backend
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(caches, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(caches, "triton")
    if spec["isolate"]:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # before CUDA starts: this rank's GPU is cuda:0
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[local] if visible else str(local)
    cuda = spec["device"] == "cuda"
    device = torch.device("cuda", 0 if spec["isolate"] else local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        result = _measure(spec, rank, world, device, os.path.join(caches, "trt_subgraph"))
        if rank == 0:
            print(MARKER + json.dumps(result), flush=True)
    finally:
        torch.compiler.reset()  # drops the CUDA graphs that captured NCCL kernels: destroy hangs on them
        dist.destroy_process_group()
    return 0


def _measure(spec: dict[str, Any], rank: int, world: int, device: torch.device, trt_cache: str) -> dict[str, Any]:
    raise_recompile_limit(64)
    sizes = spec["sizes"]
    dtype = DTYPES[spec["dtype"]]
    model, (ids,) = build("decoder", device=device, dtype=torch.float32, **sizes)  # the same on every rank
    with torch.no_grad():
        reference = model(ids).float()  # the unsharded decoder in fp32, as one process runs it
    if spec["mode"] == "tp":
        model = tensor_parallel(model, rank, world)
    model = model.to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with torch.no_grad():
        dist.barrier()
        # From the torch.compile call, as in `trt_subgraph.bench`: inductor imports itself there.
        start = time.perf_counter()
        fn = _compiled(spec, model, trt_cache)
        out = fn(ids)
        sync()
        first_s = time.perf_counter() - start
        report = _report(spec)
        trt = spec["backend"].startswith("trt_subgraph")  # the same on every rank
        background_s = _until_glue_is_built(fn, ids, sync, world) if trt else 0.0
        for _ in range(spec["warmup"]):
            fn(ids)
        sync()
        dist.barrier()
        times = _timed(fn, ids, spec["iters"], device)
        out = fn(ids)
        sync()
    every: list[Any] = [None] * world
    mine = {"first_s": first_s, "report": report, "median_ms": statistics.median(times), "background_s": background_s}
    dist.all_gather_object(every, mine)
    out = out.float()
    outputs = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(outputs, out)
    out, reference = out.cpu(), reference.cpu()
    err = (out - reference).abs().max().item()
    scale = reference.abs().max().item() or 1.0
    rank_diff = max((o.cpu() - out).abs().max().item() for o in outputs)
    return {
        "first_call_s": round(max(r["first_s"] for r in every), 4),
        "first_call_s_per_rank": [round(r["first_s"], 4) for r in every],
        "median_ms": round(max(r["median_ms"] for r in every), 4),
        "background_wait_s": round(max(r["background_s"] for r in every), 4),
        "compile_s_per_rank": [r["report"].get("compile_s") for r in every] if report else None,
        "builds_per_rank": [r["report"].get("builds") for r in every] if report else None,
        "received_per_rank": [r["report"].get("received") for r in every] if report else None,
        "unique_subgraphs": report.get("unique_subgraphs") if report else None,
        "max_abs_err": err,
        "max_rel_err": err / scale,
        "rank_max_abs_diff": rank_diff,
        "within_tolerance": err / scale <= TOLERANCE[spec["dtype"]] and rank_diff <= TOLERANCE[spec["dtype"]] * scale,
        "error": None,
    }


def _compiled(spec: dict[str, Any], model: nn.Module, trt_cache: str) -> Any:
    backend = spec["backend"]
    if backend == "eager":
        return model
    if backend == "inductor":
        return torch.compile(model, backend="inductor")
    if backend == "reduce-overhead":
        return torch.compile(model, backend="inductor", mode="reduce-overhead")
    options: dict[str, Any] = {"engine": spec["engine"], "cache_dir": trt_cache}
    if backend != "trt_subgraph":
        options["rank_split_builds"] = "off"
    if backend == "trt_subgraph-remote":
        options["remote_cache"] = spec["remote_cache"]
    return torch.compile(model, backend="trt_subgraph", options=options)


def _report(spec: dict[str, Any]) -> dict[str, Any]:
    """The totals of trt_subgraph's compilations of the first call (summed over graphs)."""
    if not spec["backend"].startswith("trt_subgraph"):
        return {}
    import trt_subgraph
    from trt_subgraph.bench._case import _summed_totals

    return _summed_totals(trt_subgraph.reports())


def _until_glue_is_built(fn: Any, ids: torch.Tensor, sync: Any, world: int, limit_s: float = 300.0) -> float:
    """Call `fn` until no rank's glue builds in the background any more (``background_glue``:
    its engines are swapped in at a call), so that latency is timed on the final engines; the
    seconds waited. Every rank makes the same calls (a tensor-parallel forward holds
    collectives). `limit_s`: the most a rank asks for another call."""
    import trt_subgraph

    start = time.perf_counter()
    while True:
        report = trt_subgraph.last_report()
        building = report is not None and bool(report.totals.get("building"))
        asks: list[Any] = [None] * world
        dist.all_gather_object(asks, building and time.perf_counter() - start < limit_s)
        if not any(asks):
            return time.perf_counter() - start
        fn(ids)
        sync()
        time.sleep(0.05)


def _timed(fn: Any, ids: torch.Tensor, iters: int, device: torch.device) -> list[float]:
    """Milliseconds of each of `iters` calls: CUDA events on a GPU, the host clock on a CPU."""
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(ids)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn(ids)
            times.append((time.perf_counter() - start) * 1e3)
    return times


def tensor_parallel(model: nn.Module, rank: int, world: int) -> nn.Module:
    """`model` (a `Decoder`) with every block replaced by this rank's :class:`ParallelDecoderBlock`.
    Raises ValueError where the heads or the MLP's hidden size do not divide by `world`."""
    check_tensor_parallel(model, world)
    for index, block in enumerate(model.layers):
        model.layers[index] = ParallelDecoderBlock(block, rank, world)
    return model


def check_tensor_parallel(model: nn.Module, world: int) -> None:
    """ValueError where a block's heads or MLP hidden size of `model` (a `Decoder`) do not divide by `world`."""
    for block in model.layers:
        hidden = block.gate_proj.out_features
        if block.heads % world or hidden % world:
            raise ValueError(f"tp: {block.heads} heads and MLP hidden size {hidden} must divide by {world} ranks")


def _shard(linear: nn.Linear, rank: int, world: int, dim: int) -> nn.Linear:
    """This rank's part of a bias-free linear: of its output features (`dim` 0) or input features (1)."""
    weight = linear.weight.detach().chunk(world, dim=dim)[rank].contiguous()
    part = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        part.weight.copy_(weight)
    return part


class ParallelDecoderBlock(nn.Module):
    """This rank's shard of a `DecoderBlock`: its heads of q/k/v and its hidden units of gate/up
    (column-parallel), the matching inputs of o and down (row-parallel), whose outputs a
    functional all-reduce over the default group sums; the norms are replicated."""

    def __init__(self, block: DecoderBlock, rank: int, world: int) -> None:
        super().__init__()
        self.heads = block.heads // world
        self.head_dim = block.q_proj.out_features // block.heads
        self.attn_norm, self.mlp_norm = block.attn_norm, block.mlp_norm
        self.q_proj, self.k_proj, self.v_proj = (
            _shard(p, rank, world, 0) for p in (block.q_proj, block.k_proj, block.v_proj)
        )
        self.o_proj = _shard(block.o_proj, rank, world, 1)
        self.gate_proj, self.up_proj = (_shard(p, rank, world, 0) for p in (block.gate_proj, block.up_proj))
        self.down_proj = _shard(block.down_proj, rank, world, 1)
        self.all_reduce = functional_all_reduce()

    def _summed(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce(x, "sum", dist.group.WORLD)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (
            p(h).view(b, s, self.heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self._summed(self.o_proj(a.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)))
        h = self.mlp_norm(x)
        return x + self._summed(self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)))


# --- output -----------------------------------------------------------------------------------


def _line(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"{row['mode']:<3} {row['backend']:<20} ERROR {row['error'][:300]}"
    return (
        f"{row['mode']:<3} {row['backend']:<20} first call {row['first_call_s']:.3f} s  steady {row['median_ms']:.3f} ms"
        f"  rel err {row['max_rel_err']:.2e}  ranks differ {row['rank_max_abs_diff']:.2e}"
    )


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table, with the split's compile time against building alone."""
    meta = result["meta"]
    lines = [
        f"# Distributed benchmark: decoder over {meta['ranks']} ranks",
        "",
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, trt_subgraph {meta['trt_subgraph']}, "
        f"{meta['device']} {meta['dtype']}, sizes {meta['sizes'] or 'default'}, engine {meta['engine']}, "
        f"GPUs isolated per rank: {meta['isolate']}",
        "",
        "| mode | backend | first call (s, slowest rank) | steady (ms, median) | trt compile (s, per rank) "
        "| builds / received (per rank) | max rel err vs fp32 | ranks differ (max abs) | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row.get("error"):
            lines.append(f"| {row['mode']} | {row['backend']} | error: {row['error'][:200]} | | | | | | |")
            continue
        compile_s = ", ".join(f"{s:.2f}" for s in row["compile_s_per_rank"]) if row.get("compile_s_per_rank") else ""
        builds = (
            ", ".join(f"{b}/{r}" for b, r in zip(row["builds_per_rank"], row["received_per_rank"]))
            if row.get("builds_per_rank")
            else ""
        )
        lines.append(
            f"| {row['mode']} | {row['backend']} | {row['first_call_s']:.3f} | {row['median_ms']:.3f} | {compile_s} "
            f"| {builds} | {row['max_rel_err']:.2e} | {row['rank_max_abs_diff']:.2e} "
            f"| {'yes' if row['within_tolerance'] else 'NO'} |"
        )
    lines += ["", *_split_summary(result["rows"], meta["ranks"])]
    return "\n".join(lines) + "\n"


def _split_summary(rows: list[dict[str, Any]], ranks: int) -> list[str]:
    """Per mode: trt_subgraph's compile time with the split over that of building alone (the
    slowest rank of each), against the target 1/N + 20%."""
    lines = []
    for mode in MODES:
        by = {r["backend"]: r for r in rows if r["mode"] == mode and not r.get("error") and r.get("compile_s_per_rank")}
        if "trt_subgraph" in by and "trt_subgraph-alone" in by:
            split, alone = (
                max(by["trt_subgraph"]["compile_s_per_rank"]),
                max(by["trt_subgraph-alone"]["compile_s_per_rank"]),
            )
            ratio = split / alone if alone else float("nan")
            target = 1 / ranks + 0.2
            lines.append(
                f"{mode}: compile with the split {split:.2f} s, alone {alone:.2f} s: {ratio:.2f} of alone "
                f"(target for the builds within it: <= {target:.2f})"
            )
    return lines


if __name__ == "__main__":
    sys.exit(main())
