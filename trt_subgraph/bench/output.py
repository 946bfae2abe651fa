"""Render sweep results: terminal table, JSON, Markdown, and PNG plots (matplotlib optional)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

COLUMNS = (
    "depth",
    "backend",
    "first call s",
    "2nd call s",
    "median ms",
    "p10-p90 ms",
    "peak MB",
    "rel err",
    "uniq/builds/reuses",
    "fallback",
    "status",
)


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _series(row: dict[str, Any]) -> str:
    return row["backend"] + {"warm": " (warm)", "saved": " (saved)"}.get(row.get("variant"), "")


def _status(row: dict[str, Any], width: int) -> str:
    if row.get("status") == "ok":
        note = row.get("trt_report_error")
        return "ok" if not note else f"ok (report: {note})"[:width]
    err = " ".join(str(row.get("error", "")).split())
    return f"{row.get('status', 'error')}: {err}"[:width]


def _first_call(row: dict[str, Any]) -> str:
    runs = row.get("first_call_s_runs")
    if not runs:
        return _num(row.get("first_call_s"))
    return f"{_num(row['first_call_s'])} ({_num(min(runs))}-{_num(max(runs))})"


def _latency(row: dict[str, Any]) -> str:
    runs = row.get("latency_ms_median_runs")
    if not runs:
        return _num(row.get("latency_ms_median"))
    return f"{_num(row['latency_ms_median_of_runs'])} ({_num(min(runs))}-{_num(max(runs))})"


def _spread(row: dict[str, Any]) -> str:
    if row.get("latency_ms_p10") is None:
        return ""
    return f"{_num(row['latency_ms_p10'])}-{_num(row['latency_ms_p90'])}"


def cells(row: dict[str, Any], err_width: int = 70) -> list[str]:
    """One table row as strings, in COLUMNS order."""
    totals = row.get("trt_totals") or {}
    trt = "/".join(str(totals.get(k, "?")) for k in ("unique_subgraphs", "builds", "reuses")) if totals else ""
    spread = _spread(row)
    rel = row.get("rel_err")
    return [
        "" if row.get("depth") is None else str(row["depth"]),
        _series(row),
        _first_call(row),
        _num(row.get("second_call_s")),
        _latency(row),
        spread,
        _num(row.get("peak_mem_mb")),
        "" if rel is None else f"{rel:.1e}",
        trt,
        _fallback(totals),
        _status(row, err_width),
    ]


def _fallback(totals: dict[str, Any]) -> str:
    """Nodes run in PyTorch, and the subgraphs whose engine failed to build (they run in PyTorch)."""
    if not totals:
        return ""
    nodes, failed = str(totals.get("fallback_nodes", "?")), totals.get("fallbacks", 0)
    return nodes if not failed else f"{nodes} + {failed} subgraph{'s' * (failed > 1)}"


def sweep_columns(dim: str) -> tuple[str, ...]:
    """Columns of a size sweep's table; `dim` ("batch" or "seq") heads the size column."""
    return (
        "depth",
        dim,
        "backend",
        "first call s",
        "2nd call s",
        "median ms",
        "p10-p90 ms",
        "rel err",
        "builds/fallbacks",
        "fallback nodes",
        "status",
    )


def sweep_cells(row: dict[str, Any], err_width: int = 70) -> list[str]:
    """One row of a size sweep (one case at one size) as strings, in sweep_columns order. The
    trt_subgraph columns count what was compiled at that size (0/0: nothing new)."""
    totals = row.get("trt_totals") or {}
    compiled = "trt_compiles" in row
    rel = row.get("rel_err")
    return [
        "" if row.get("depth") is None else str(row["depth"]),
        "" if row.get("size") is None else str(row["size"]),
        _series(row),
        _num(row.get("first_call_s")),
        _num(row.get("second_call_s")),
        _num(row.get("latency_ms_median")),
        _spread(row),
        "" if rel is None else f"{rel:.1e}",
        f"{totals.get('builds', 0)}/{totals.get('fallbacks', 0)}" if compiled else "",
        str(totals.get("fallback_nodes", 0)) if compiled else "",
        _status(row, err_width),
    ]


def _sweep_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A model's sweep rows grouped by depth, then size in call order, then backend (as run)."""
    depths = {d: i for i, d in enumerate(dict.fromkeys(str(r.get("depth")) for r in rows))}
    series = {b: i for i, b in enumerate(dict.fromkeys(_series(r) for r in rows))}
    return sorted(rows, key=lambda r: (depths[str(r.get("depth"))], r.get("call_order", -1), series[_series(r)]))


def _sweep_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per depth, one line: each backend's sum of first calls over the sizes (the range over
    runs), and trt_subgraph's compilations, builds and fallbacks over the whole sweep."""
    lines = []
    for depth in dict.fromkeys(r.get("depth") for r in rows):
        cases: dict[str, dict[str, Any]] = {}
        for r in rows:
            if r.get("depth") == depth:
                cases.setdefault(_series(r), r)
        dim, n = rows[0]["dim"], len({r.get("size") for r in rows if r.get("depth") == depth})
        parts = []
        for name, r in cases.items():
            if r.get("status") != "ok":
                parts.append(f"{name} {r.get('status', 'error')}")
                continue
            text = f"{name} {_num(r.get('first_call_s_sum'))} s"
            notes = []
            runs = r.get("first_call_s_sum_runs")
            if runs:
                notes.append(f"{_num(min(runs))}-{_num(max(runs))} over {len(runs)} runs")
            totals = r.get("trt_sweep_totals")
            if totals is not None:
                notes.append(
                    f"{r.get('trt_sweep_compiles', '?')} compilations, {totals.get('builds', 0)} builds, "
                    f"{totals.get('fallbacks', 0)} fallbacks, {totals.get('fallback_nodes', 0)} fallback nodes"
                )
            parts.append(text + (f" ({'; '.join(notes)})" if notes else ""))
        at = "" if depth is None else f" at depth {depth}"
        lines.append(f"Sum of first calls over the {n} {dim} sizes{at}: " + ", ".join(parts) + ".")
    return lines


def _table(rows: list[dict[str, Any]], err_width: int) -> tuple[tuple[str, ...], list[list[str]], list[str]]:
    """(columns, cells per row, summary lines) of one model's rows: a size sweep's table when the
    rows come from one, else the standard table."""
    if rows and "dim" in rows[0]:
        ordered = _sweep_order(rows)
        return sweep_columns(rows[0]["dim"]), [sweep_cells(r, err_width) for r in ordered], _sweep_summary(rows)
    return COLUMNS, [cells(r, err_width) for r in rows], []


def _by_model(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["model"], []).append(r)
    return out


def terminal_table(data: dict[str, Any]) -> str:
    """Fixed-width table, one block per model."""
    lines: list[str] = []
    for model, rows in _by_model(data["results"]).items():
        columns, body, summary = _table(rows, 70)
        table = [list(columns), *body]
        widths = [max(len(t[i]) for t in table) for i in range(len(columns))]
        lines.append(f"== {model} ==")
        for j, t in enumerate(table):
            lines.append("  ".join(c.ljust(w) for c, w in zip(t, widths)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += summary
        lines.append("")
    return "\n".join(lines)


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|")


def _sizes(rows: list[dict[str, Any]]) -> str:
    swept = ("depth", rows[0].get("dim"))  # a size sweep's size is a column
    sizes = {k: v for k, v in (rows[0].get("sizes") or {}).items() if k not in swept}
    return ", ".join(f"{k} {v}" for k, v in sizes.items())


def markdown(data: dict[str, Any], images: Iterable[str] = ()) -> str:
    """Markdown report: machine, date, versions, settings, method, one table per model, plots."""
    meta, cfg = data["meta"], data["meta"]["config"]
    runs = cfg.get("runs", 1)  # results files from before --runs have none
    v = meta["versions"]
    vers = ", ".join(f"{k} {val if val else '(not installed)' if k != 'cuda' else 'none'}" for k, val in v.items())
    timer = "CUDA events" if cfg["device"].startswith("cuda") else "time.perf_counter"
    mem = (
        "torch.cuda.max_memory_allocated after the reference (PyTorch allocator only)"
        if cfg["device"].startswith("cuda")
        else "the case process's max RSS (includes the fp32 reference)"
    )
    out = [
        f"# {cfg.get('title') or 'trt-subgraph bench'}",
        "",
        f"- Machine: {meta['machine']}",
        f"- Date: {meta['date']}",
        f"- Versions: {vers}",
        f"- Settings: device {cfg['device']}, dtype {cfg['dtype']}, warmup {cfg['warmup']}, "
        f"repeats {cfg['repeats']}, runs {runs}, seed {cfg['seed']}, 2:4 pruned: {'yes' if cfg['sparse'] else 'no'}, "
        f"trt_subgraph options: {json.dumps(cfg['trt_options']) if cfg['trt_options'] else 'defaults'}",
    ]
    commands = meta.get("commands") or []
    if commands:
        out.append(
            "- Command"
            + ("s:" if len(commands) > 1 else ":")
            + "".join(f"\n  `{c}`" if len(commands) > 1 else f" `{c}`" for c in commands)
        )
    out += [
        "",
        "Each case runs in a fresh process with empty inductor, triton and trt_subgraph caches. "
        "*first call* = the torch.compile call + compile + first run (synchronized); *(warm)* rows are a second process that "
        "reuses only the trt_subgraph disk cache of the cold run; *(saved)* rows are a process with "
        "every cache empty that loads the function another process compiled ahead of time and saved "
        "(trt_subgraph.save / load). *2nd call*: the next call "
        "(synchronized), where trt_subgraph and reduce-overhead record their CUDA graphs. *median* and "
        f"*p10-p90*: latency of steady-state calls after warmup ({timer}). *peak MB*: {mem}. *rel err*: "
        "‖y − ref‖ / ‖ref‖ in fp32 against an fp32 eager run of the same weights and inputs (worst of "
        "the first and a steady-state call). *uniq/builds/reuses*, *fallback*: trt_subgraph's report "
        "totals (unique subgraphs, engine builds, reuses; nodes run in PyTorch, + the subgraphs whose "
        "engine failed to build, which run in PyTorch too)."
        + (
            " With several runs per case (round by round, each a fresh process), a row is the run "
            "with the median first call (of an even count, the faster middle one); the range of all "
            "runs' first calls is in brackets. *median* is then the median over the runs of each "
            "run's median, with their range in brackets; *p10-p90* is the row's run's own."
            if runs > 1
            else ""
        ),
        "",
    ]
    sweep = cfg.get("batches") or cfg.get("seqs")
    if sweep:
        dim = "batch size" if cfg.get("batches") else "sequence length"
        out += [
            f"Dynamic shapes: each case calls its one compiled model at {dim}s "
            f"{', '.join(map(str, sweep))}, in this order, in one process (inputs of each size from the "
            "model's own input builder, same weights); *first call* (compile or recompile + run) and "
            "*2nd call* per size as they happen; then, once every size was seen, *median*, *p10-p90* "
            "and *rel err* per size. *builds/fallbacks* and *fallback nodes*: what trt_subgraph "
            "compiled at that size (engine builds / pieces that fell back to PyTorch, nodes run in "
            "PyTorch). The line under each table sums the first calls over the sizes"
            + (" (of the median run by that sum)" if runs > 1 else "")
            + ", with trt_subgraph's compilations over the whole sweep. "
            + (
                "torch.compile ran with dynamic=True."
                if cfg.get("dynamic")
                else "torch.compile ran with its default dynamic=None (static, then automatic dynamic "
                "on the first recompile)."
            ),
            "",
        ]
    for model, rows in _by_model(data["results"]).items():
        out += [f"## {model}", ""]
        if rows[0].get("sizes"):
            out += [f"Sizes: {_sizes(rows)}.", ""]
        columns, body, summary = _table(rows, 200)
        out.append("| " + " | ".join(columns) + " |")
        out.append("|" + "---|" * len(columns))
        for c in body:
            out.append("| " + " | ".join(_md_escape(x) for x in c) + " |")
        out.append("")
        for line in summary:
            out += [line, ""]
    for img in images:
        out += [f"![{Path(img).stem}]({img})", ""]
    return "\n".join(out)


def _x(row: dict[str, Any]) -> int | None:
    d = row.get("depth")
    return d if isinstance(d, int) else row.get("blocks")


def plots(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """first_call.png (first-call time vs depth per backend) and latency.png (median latency per
    backend and depth, p10-p90 whiskers); [] when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None or any("dim" in r for r in data["results"]):
        return []  # a size sweep's tables hold its figures; the plots are over depth
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {
        m: [r for r in rows if r.get("status") == "ok" and _x(r) is not None]
        for m, rows in _by_model(data["results"]).items()
    }
    groups = {m: rows for m, rows in groups.items() if rows}
    if not groups:
        return []
    unit = "GPU" if data["meta"]["config"]["device"].startswith("cuda") else "CPU"
    written = []
    n = len(groups)
    ncols = min(n, 2)
    nrows = (n + ncols - 1) // ncols
    size = (5.5 * ncols + 0.5, 3.8 * nrows + 0.4)
    # One colour per backend across all subplots and both figures.
    names_all = list(dict.fromkeys(_series(r) for rows in groups.values() for r in rows))
    colors = {name: f"C{i % 10}" for i, name in enumerate(names_all)}

    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    for ax, (model, rows) in zip(axes.flat, groups.items()):
        for name in dict.fromkeys(_series(r) for r in rows):
            pts = sorted(
                (_x(r), r["first_call_s"], r.get("first_call_s_runs") or [r["first_call_s"]])
                for r in rows
                if _series(r) == name
            )
            ax.errorbar(
                [p[0] for p in pts],
                [p[1] for p in pts],
                fmt="o-",
                capsize=3,
                label=name,
                color=colors[name],
                yerr=[[p[1] - min(p[2]) for p in pts], [max(p[2]) - p[1] for p in pts]],
            )
        ax.set_xticks(sorted({_x(r) for r in rows}))
        ax.set_title(model)
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel("first call: compile + run (s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    runs = data["meta"]["config"].get("runs", 1)
    title = (
        f"Cold first call vs depth ({unit}; median, range of {runs} fresh runs)"
        if runs > 1
        else f"Cold first-call time vs depth ({unit}, fresh process and caches)"
    )
    written.append(_finish(plt, fig, axes, n, title, out_dir / "first_call.png"))

    fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
    for ax, (model, rows) in zip(axes.flat, groups.items()):
        depths = sorted({_x(r) for r in rows})
        names = list(dict.fromkeys(_series(r) for r in rows))
        bar = 0.8 / len(names)
        for k, name in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for i, d in enumerate(depths):
                r = next((r for r in rows if _series(r) == name and _x(r) == d), None)
                if r is not None:
                    xs.append(i + (k - (len(names) - 1) / 2) * bar)
                    ys.append(r["latency_ms_median"])
                    lo.append(r["latency_ms_median"] - r["latency_ms_p10"])
                    hi.append(r["latency_ms_p90"] - r["latency_ms_median"])
            ax.bar(xs, ys, bar, yerr=[lo, hi], capsize=2, label=name, color=colors[name])
        ax.set_xticks(range(len(depths)), [str(d) for d in depths])
        ax.set_title(model)
        ax.set_xlabel("depth (blocks)")
        lat = [r["latency_ms_median"] for r in rows]
        if max(lat) > 20 * min(lat):  # eager vs compiled on CPU can differ by orders of magnitude
            ax.set_yscale("log")
        ax.set_ylabel("median latency (ms" + (", log scale)" if max(lat) > 20 * min(lat) else ")"))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    written.append(
        _finish(
            plt, fig, axes, n, f"Steady-state latency per backend ({unit}, p10-p90 whiskers)", out_dir / "latency.png"
        )
    )
    return written


def _finish(plt: Any, fig: Any, axes: Any, used: int, title: str, path: Path) -> Path:
    """Blank the unused panels, title, save and close one figure."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_all(data: dict[str, Any], out_dir: Path, with_plots: bool = True) -> list[Path]:
    """results.json, the PNGs (when asked and possible) and results.md into out_dir; returns the
    paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "results.json"
    js.write_text(json.dumps(data, indent=1) + "\n")
    images = plots(data, out_dir) if with_plots else []
    md = out_dir / "results.md"
    md.write_text(markdown(data, [p.name for p in images]))
    return [js, md, *images]
