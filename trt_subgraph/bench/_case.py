"""One benchmark case, run in a fresh process: `python -m trt_subgraph.bench._case '<json spec>'`.

Why a process per case: compile times are only honest cold (no warm dynamo, inductor or
trt_subgraph state), and a crash or hang of one backend must not take the sweep down. The
parent gives each case empty compiler cache directories through the environment. The result
is one JSON line on stdout prefixed with `MARKER`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
import traceback
from typing import Any

MARKER = "@@trt_subgraph.bench@@ "


def machine_name(device: str) -> str:
    """GPU name on CUDA, else the CPU model (what the numbers were measured on)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _tensors(out: Any) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _flat_fp32(out: Any):
    import torch

    ts = [t.detach().float().reshape(-1) for t in _tensors(out) if t.is_floating_point()]
    if not ts:
        raise TypeError(f"model output has no floating-point tensor: {type(out).__name__}")
    return torch.cat(ts)


def rel_err(out: Any, ref) -> float:
    """||y - ref|| / ||ref|| over all floating outputs, in fp32."""
    y = _flat_fp32(out).to(ref.device)
    if y.shape != ref.shape:
        raise ValueError(f"output has {y.numel()} elements, the reference {ref.numel()}")
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def _quantile(sorted_xs: list[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def _from_factory(name: str, kwargs: dict[str, Any], device: str, seed: int):
    """The user's factory(**kwargs) under `seed`: (fp32 model on `device`, inputs there)."""
    import torch

    from trt_subgraph.cli.factory import load_factory

    factory = load_factory(name)
    torch.manual_seed(seed)
    got = factory(**kwargs)
    if not (isinstance(got, (tuple, list)) and len(got) == 2 and isinstance(got[0], torch.nn.Module)):
        raise TypeError(f"factory {name} must return (nn.Module, example_inputs), got {type(got).__name__}")
    model, inputs = got
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    model = model.eval().to(device).float()
    inputs = tuple(t.to(device).float() if t.is_floating_point() else t.to(device) for t in inputs)
    return model, inputs


def _build(spec: dict[str, Any]):
    """Model and inputs in fp32 on the device (weights seeded), plus facts for the row."""
    import torch

    from trt_subgraph.bench import models

    name, kwargs, device = spec["model"], dict(spec.get("model_kwargs") or {}), spec["device"]
    if name in models.MODELS:
        return models.build(name, dtype=torch.float32, device=device, seed=spec["seed"], **kwargs)
    return _from_factory(name, kwargs, device, spec["seed"])


def _sized_inputs(spec: dict[str, Any], model, inputs) -> list[tuple[int | None, tuple]]:
    """(size, fp32 inputs) per size of the spec's sweep, in call order; [(None, inputs)] without one.

    Built-in models: ``models.make_inputs`` on the one model (same weights, same seeded
    generator as its example inputs). A factory is called again per size under the same seed and
    only its inputs are kept."""
    from trt_subgraph.bench import models

    sweep = spec.get("sweep")
    if not sweep:
        return [(None, inputs)]
    name, kwargs, dim = spec["model"], dict(spec.get("model_kwargs") or {}), sweep["dim"]
    out = []
    for size in sweep["sizes"]:
        if name in models.MODELS:
            sizes = {**models.DEFAULTS[name], **kwargs, dim: size}
            x = models.make_inputs(
                name, model, batch=sizes["batch"], seq=sizes.get("seq"), image=sizes.get("image"), seed=spec["seed"]
            )
        else:
            _, x = _from_factory(name, {**kwargs, dim: size}, spec["device"], spec["seed"])
        out.append((size, x))
    return out


def _latency_ms(times_ms: list[float]) -> dict[str, float]:
    times_ms = sorted(times_ms)
    return {
        "latency_ms_median": _quantile(times_ms, 0.5),
        "latency_ms_p10": _quantile(times_ms, 0.1),
        "latency_ms_p90": _quantile(times_ms, 0.9),
    }


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, reference, compile + first call, warm up, time; returns the result row fields.

    With ``spec["sweep"] = {"dim": "batch" | "seq", "sizes": [...]}`` the one compiled model is
    called at every size in the given order (first and second call each, timed), then, after
    all sizes were seen, warmed up and timed per size; the per-size fields are in
    ``per_size`` (in call order) and ``first_call_s`` is their sum."""
    phase = "import"
    res: dict[str, Any] = {"status": "error"}
    try:
        import torch

        from trt_subgraph.bench.backends import find_blocks, prepare, saved_function
        from trt_subgraph.bench.models import DTYPES
        from trt_subgraph.report import collect

        phase = "build"
        device = spec["device"]
        cuda = device.startswith("cuda")
        if cuda and not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        dtype = DTYPES[spec["dtype"]]
        res["machine"] = machine_name(device)
        sweep = spec.get("sweep")
        trt = spec["backend"] == "trt_subgraph"

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        with torch.no_grad(), collect() as recorded:  # every trt_subgraph report, however many
            phase = "build"
            model, inputs = _build(spec)
            res["blocks"] = len(find_blocks(model))
            res["params"] = sum(p.numel() for p in model.parameters())
            if spec.get("sparse"):
                phase = "sparse"
                from trt_subgraph.sparse.analysis import prune_2_4

                res["pruned_layers"] = len(prune_2_4(model).pruned)
            sized = _sized_inputs(spec, model, inputs)
            del inputs

            phase = "reference"
            # A sweep keeps one reference per size: on the CPU, out of the device's memory.
            refs = [_flat_fp32(model(*x)).to("cpu" if sweep else device) for _, x in sized]
            model.to(dtype)
            sized = [(size, tuple(t.to(dtype) if t.is_floating_point() else t for t in x)) for size, x in sized]
            sync()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

            phase = "compile"
            # The first call is timed from here: torch.compile with an inductor backend imports
            # inductor when it is called, trt_subgraph at its first call.
            sync()
            compile_start = time.perf_counter()
            if spec.get("saved"):  # {"role": "write" or "load", "folder": ...}
                fn, info = saved_function(
                    spec["saved"]["role"], spec["saved"]["folder"], model, spec.get("trt_options") or {}
                )
            else:
                fn, info = prepare(
                    spec["backend"],
                    model,
                    dtype=dtype,
                    trt_options=spec.get("trt_options") or {},
                    tt_options=spec.get("tt_options") or {},
                    dynamic=bool(spec.get("dynamic")),
                )
            res.update(info)
            res["compile_call_s"] = time.perf_counter() - compile_start
            counted = 0  # reports of `recorded` that an earlier size compiled

            def timed_call(x: tuple) -> tuple[Any, float]:
                """One synchronized call of the compiled model: its output and its seconds."""
                sync()
                t0 = time.perf_counter()
                out = fn(*x)
                sync()
                return out, time.perf_counter() - t0

            entries: list[dict[str, Any]] = []
            if sweep:
                res["per_size"] = entries  # filled as it goes: a failed sweep keeps the sizes it did
            for order, ((size, x), ref) in enumerate(zip(sized, refs)):
                at = "" if size is None else f" ({sweep['dim']} {size})"
                entry: dict[str, Any] = {} if size is None else {"size": size, "call_order": order}
                phase = "first call" + at
                out, entry["first_call_s"] = timed_call(x)
                if order == 0:
                    entry["first_call_s"] += res["compile_call_s"]
                entry["rel_err"] = rel_err(out, ref)
                del out
                if trt and not sweep:
                    res.update(_trt_report())
                phase = "second call" + at  # where CUDA graphs get recorded (trt_subgraph, reduce-overhead)
                _, entry["second_call_s"] = timed_call(x)
                if trt and sweep:
                    entry.update(_trt_new(recorded[counted:]))  # what this size compiled
                    counted = len(recorded)
                entries.append(entry)
            if trt:
                phase = "background builds"
                res["background_wait_s"] = _wait_for_background_builds(fn, sized[0][1], sync)
            for (size, x), ref, entry in zip(sized, refs, entries):
                at = "" if size is None else f" ({sweep['dim']} {size})"
                phase = "warmup" + at
                for _ in range(spec["warmup"]):
                    fn(*x)
                sync()
                phase = "timing" + at
                times_ms: list[float] = []
                for _ in range(spec["repeats"]):
                    if cuda:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        fn(*x)
                        end.record()
                        end.synchronize()
                        times_ms.append(start.elapsed_time(end))
                    else:
                        t0 = time.perf_counter()
                        fn(*x)
                        times_ms.append((time.perf_counter() - t0) * 1e3)
                phase = "accuracy" + at
                out = fn(*x)
                sync()
                entry["rel_err"] = max(entry["rel_err"], rel_err(out, ref))  # worst of first and steady state
                del out
                entry.update(_latency_ms(times_ms))
        if sweep:
            res["first_call_s"] = sum(e["first_call_s"] for e in entries)
            if trt:
                res.update(_trt_sweep_report(recorded))
        else:
            res.update(entries[0])
        res["timer"] = "cuda_events" if cuda else "perf_counter"
        if cuda:
            res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
            res["mem_kind"] = "cuda_max_allocated"
        else:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            res["peak_mem_mb"] = rss / (2**20 if sys.platform == "darwin" else 2**10)
            res["mem_kind"] = "process_max_rss"
        res["status"] = "ok"
    except Exception as e:  # every failure becomes a row, with the phase it happened in
        traceback.print_exc()
        res["error"] = f"{phase}: {type(e).__name__}: {e}".strip()
    return res


def _wait_for_background_builds(fn: Any, x: tuple, sync: Any, limit_s: float = 300.0) -> float:
    """Call `fn` until no glue builds in the background any more (``background_glue``: the
    engines are swapped in at a call), so that latency is timed on the final engines; the
    seconds waited. `limit_s`: the most to wait (a worker's build time-out is longer; a glue
    build that never ends is timed as PyTorch runs it)."""
    import trt_subgraph

    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        report = trt_subgraph.last_report()
        if report is None or not report.totals.get("building"):
            break
        fn(*x)
        sync()
        time.sleep(0.05)
    return time.perf_counter() - start


def _summed_totals(reports: list) -> dict[str, Any]:
    """trt_subgraph report totals added up over `reports` (one per Dynamo graph compiled)."""
    totals: dict[str, Any] = {}
    for r in reports:
        for key, value in r.totals.items():
            totals[key] = totals.get(key, 0) + value
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in totals.items()}


def _trt_new(new: list) -> dict[str, Any]:
    """The trt_subgraph compilations of one size, from their reports: count and summed totals."""
    return {"trt_compiles": len(new), "trt_totals": _summed_totals(new)}


def _trt_sweep_report(reports: list) -> dict[str, Any]:
    """After a sweep: every trt_subgraph compilation of the case, from their `reports` (count,
    summed totals), the engine and CUDA-graph mode of the last; or why not."""
    try:
        last = reports[-1].to_dict() if reports else {}
        return {
            "trt_engine": last.get("engine"),
            "trt_cudagraphs": last.get("cudagraphs"),
            "trt_sweep_compiles": len(reports),
            "trt_sweep_totals": _summed_totals(reports),
        }
    except Exception as e:
        return {"trt_report_error": f"{type(e).__name__}: {e}"}


def _trt_report() -> dict[str, Any]:
    """trt_subgraph's report of the compilation just done (totals and engine), or why not."""
    try:
        import trt_subgraph

        d = trt_subgraph.last_report().to_dict()
        sparsity = d.get("sparsity") or {}
        return {
            "trt_engine": d.get("engine"),
            "trt_totals": d.get("totals"),
            "trt_sparse_layers": len(sparsity.get("sparse", [])),
            "trt_cudagraphs": d.get("cudagraphs"),
        }
    except Exception as e:
        return {"trt_report_error": f"{type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m trt_subgraph.bench._case '<json spec>'", file=sys.stderr)
        return 2
    res = run_case(json.loads(argv[0]))
    print(MARKER + json.dumps(res), flush=True)
    return 0 if res["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
