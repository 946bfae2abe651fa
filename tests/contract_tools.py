"""Check the TensorRT adapter's API contract against published wheels, without importing them.

TensorRT cannot be installed where trt_subgraph is developed, so the adapter's calls are checked
statically: torch_tensorrt's Python sources are parsed with ``ast`` (every function, keyword and
settings field in ``TORCH_TRT_CONTRACT`` must be declared), and TensorRT's compiled pybind11
bindings are searched for every name in ``TRT_CONTRACT``. pybind11 registers names as C string
literals, and the linker merges a literal into the tail of a longer one ("REFIT" lives inside
"INCLUDE_REFIT"), so a plain substring search would accept names that are not registered at all.
We accept a name only if the code references its first byte (a RIP-relative ``lea`` or a
relative relocation pointing exactly there), which is what registering it takes.

Run ``python tests/contract_tools.py [--dir DIR]`` for a report; the tests use the functions.
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# label -> (distribution, version). The bindings pair with torch_tensorrt through its METADATA
# (2.11.0 requires tensorrt-cu13-bindings>=10.15.1,<10.16.0; 2.13.0 requires >=11.0.0,<11.1.0;
# 2.14.0 requires >=11.1.0,<11.2.0). TensorRT 11.4 (the newest bindings) pairs with no
# torch_tensorrt release; the export's refit script and the adapter's TensorRT names are
# checked against it too.
WHEELS = {
    "torch_tensorrt-2.11": ("torch_tensorrt", "2.11.0"),
    "torch_tensorrt-2.13": ("torch_tensorrt", "2.13.0"),
    "torch_tensorrt-2.14": ("torch_tensorrt", "2.14.0"),
    "tensorrt-10.15": ("tensorrt-cu13-bindings", "10.15.1.29"),
    "tensorrt-11.0": ("tensorrt-cu13-bindings", "11.0.0.114"),
    "tensorrt-11.1": ("tensorrt-cu13-bindings", "11.1.0.106"),
    "tensorrt-11.4": ("tensorrt-cu13-bindings", "11.4.0.106"),
}
PAIRS = [
    ("torch_tensorrt-2.11", "tensorrt-10.15"),
    ("torch_tensorrt-2.13", "tensorrt-11.0"),
    ("torch_tensorrt-2.14", "tensorrt-11.1"),
]
PLATFORM_ARGS = ["--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"]
_NETWORK_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Name or service not known",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ConnectTimeoutError",
    "Connection refused",
    "No route to host",
    "ProxyError",
    "ReadTimeoutError",
)


class NetworkUnavailable(RuntimeError):
    """pip could not reach the package index (the only reason a contract test may skip)."""


def default_dir() -> Path:
    return Path(os.environ.get("TRT_SUBGRAPH_CONTRACT_DIR") or Path.home() / ".cache" / "trt_subgraph_contract")


def _wheel_in(directory: Path, dist: str, version: str) -> Path | None:
    stem = re.sub(r"[-_.]+", "_", dist).lower()
    found = sorted(directory.glob(f"{stem}-{version}-*.whl"))
    return found[0] if found else None


def fetch(directory: Path) -> dict[str, Path]:
    """Every wheel in WHEELS under ``directory`` (pip download --no-deps when absent)."""
    directory.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    paths = {}
    with FileLock(str(directory / ".download.lock")):
        for label, (dist, version) in WHEELS.items():
            wheel = _wheel_in(directory, dist, version)
            if wheel is None:
                _pip_download(directory, f"{dist}=={version}")
                wheel = _wheel_in(directory, dist, version)
                if wheel is None:
                    raise RuntimeError(f"pip downloaded {dist}=={version} but no matching wheel is in {directory}")
            paths[label] = wheel
    return paths


def _pip_download(directory: Path, requirement: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        *PLATFORM_ARGS,
        "-d",
        str(directory),
        "--timeout",
        "20",
        "--retries",
        "1",
        "--disable-pip-version-check",
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return
    output = proc.stdout + proc.stderr
    if "(from versions: none)" in output and any(m in output for m in _NETWORK_MARKERS):
        raise NetworkUnavailable(
            f"pip could not reach the package index for {requirement}: "
            + next(line for line in output.splitlines() if any(m in line for m in _NETWORK_MARKERS))
        )
    raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{output[-3000:]}")


def wheel_metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return zf.read(name).decode()


def requirement_for(wheel: Path, dist: str) -> str:
    """The specifier a wheel's METADATA puts on ``dist`` (e.g. ``<10.16.0,>=10.15.1``)."""
    from packaging.requirements import Requirement

    for line in wheel_metadata(wheel).splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.name.replace("_", "-").lower() == dist.replace("_", "-").lower() and req.marker is None:
                return str(req.specifier)
    raise LookupError(f"{wheel.name} does not require {dist}")


def extract(wheel: Path, directory: Path, predicate) -> Path:
    """Unpack the members of ``wheel`` matching ``predicate`` into ``directory/<wheel stem>``."""
    target = directory / wheel.stem
    marker = target / ".complete"
    if not marker.exists():
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if predicate(name):
                    zf.extract(name, target)
        marker.touch()
    return target


# ---- torch_tensorrt: static resolution of dotted names over its sources --------------------


class SourceTree:
    """Resolves ``torch_tensorrt.a.b.name`` to its ``def``/``class``/assignment, following imports."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def module_path(self, dotted: str) -> Path | None:
        base = self.root.joinpath(*dotted.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    @functools.cache
    def module_ast(self, dotted: str) -> ast.Module:
        return ast.parse(self.module_path(dotted).read_text(), filename=dotted)

    def resolve(self, dotted: str) -> tuple[str, Any] | None:
        """("module", name) | ("function", FunctionDef, is_method) | ("class", ClassDef) | ("value", node)."""
        parts = dotted.split(".")
        if self.module_path(parts[0]) is None:
            return None
        found: tuple[str, Any] | None = ("module", parts[0])
        for part in parts[1:]:
            found = self._member(found, part)
            if found is None:
                return None
        return found

    def _member(self, owner: tuple[str, Any], name: str) -> tuple[str, Any] | None:
        if owner[0] == "module":
            return self._lookup(owner[1], name, frozenset())
        if owner[0] == "class":
            for stmt in owner[1].body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in stmt.decorator_list)
                    return ("function", stmt, not static)
                if isinstance(stmt, ast.ClassDef) and stmt.name == name:
                    return ("class", stmt)
                if name in _assigned_names(stmt):
                    return ("value", stmt)
        return None

    def _lookup(self, module: str, name: str, seen: frozenset) -> tuple[str, Any] | None:
        if (module, name) in seen:
            return None
        seen = seen | {(module, name)}
        found = None
        stars = []
        for stmt in _module_statements(self.module_ast(module)):
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name:
                found = ("function", stmt, False)
            elif isinstance(stmt, ast.ClassDef) and stmt.name == name:
                found = ("class", stmt)
            elif name in _assigned_names(stmt):
                found = ("value", stmt)
            elif isinstance(stmt, ast.ImportFrom):
                source = self._absolute(module, stmt)
                for alias in stmt.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name and source is not None:
                        found = self._lookup_or_submodule(source, alias.name, seen)
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname == name:
                        found = ("module", alias.name) if self.module_path(alias.name) else None
        if found is not None:
            return found
        if not name.startswith("_"):
            for source in stars:
                if source is not None and self._exported(source, name):
                    hit = self._lookup(source, name, seen)
                    if hit is not None:
                        return hit
        if self.module_path(f"{module}.{name}") is not None:
            return ("module", f"{module}.{name}")
        return None

    def _lookup_or_submodule(self, module: str, name: str, seen: frozenset) -> tuple[str, Any] | None:
        if self.module_path(module) is None:
            return None
        return self._lookup(module, name, seen)

    def _exported(self, module: str, name: str) -> bool:
        for stmt in _module_statements(self.module_ast(module)):
            if "__all__" in _assigned_names(stmt):
                try:
                    return name in ast.literal_eval(stmt.value)
                except ValueError:
                    return True
        return True

    def _absolute(self, module: str, stmt: ast.ImportFrom) -> str | None:
        if stmt.level == 0:
            return stmt.module if self.module_path(stmt.module.split(".")[0]) else None
        package = module if self.module_path(module).name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(stmt.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{stmt.module}" if stmt.module else package


def _module_statements(tree: ast.Module) -> Iterator[ast.stmt]:
    """Module-level statements, including those under if/try/with (conditional imports)."""
    stack = list(reversed(tree.body))
    while stack:
        stmt = stack.pop()
        yield stmt
        if isinstance(stmt, (ast.If, ast.Try, ast.With)):
            nested = [*stmt.body, *getattr(stmt, "orelse", []), *getattr(stmt, "finalbody", [])]
            for handler in getattr(stmt, "handlers", []):
                nested.extend(handler.body)
            stack.extend(reversed(nested))


def _assigned_names(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return {stmt.target.id}
    if isinstance(stmt, ast.Assign):
        return {t.id for t in stmt.targets if isinstance(t, ast.Name)}
    return set()


def _class_fields(cls: ast.ClassDef) -> list[str]:
    return [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]


def _parameters(fn: ast.FunctionDef, is_method: bool) -> tuple[list[str], list[str], bool]:
    """(positional parameter names, keyword-passable names, has *args)."""
    positional = [a.arg for a in (*fn.args.posonlyargs, *fn.args.args)]
    keywords = [a.arg for a in (*fn.args.args, *fn.args.kwonlyargs)]
    if is_method and positional:
        dropped = positional.pop(0)
        keywords = [k for k in keywords if k != dropped]
    return positional, keywords, fn.args.vararg is not None


def check_torch_trt(tree: SourceTree, contract: dict[str, dict[str, Any]]) -> list[str]:
    """Problems of ``contract`` against one torch_tensorrt source tree (empty list: all declared).

    A keyword counts only when declared by name: a ``**kwargs`` catch-all does not, because
    torch_tensorrt silently drops unknown keywords there.
    """
    problems = []
    for dotted, spec in contract.items():
        found = tree.resolve(dotted)
        if found is None:
            problems.append(f"{dotted}: not found")
            continue
        kind = found[0]
        if kind == "function":
            positional, keywords, varargs = _parameters(found[1], found[2])
        elif kind == "class":
            init = next((s for s in found[1].body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
            if init is not None:
                positional, keywords, varargs = _parameters(init, True)
            else:  # dataclass / NamedTuple: the constructor takes the fields
                positional = keywords = _class_fields(found[1])
                varargs = False
        else:
            positional, keywords, varargs = [], [], False
        if "positional" in spec and not varargs and len(positional) < spec["positional"]:
            problems.append(f"{dotted}: takes {len(positional)} positional arguments, we pass {spec['positional']}")
        for keyword in spec.get("kwargs", []):
            if keyword not in keywords:
                problems.append(f"{dotted}: no parameter {keyword!r}")
        if "fields" in spec:
            fields = _class_fields(found[1]) if kind == "class" else []
            for field in spec["fields"]:
                if field not in fields:
                    problems.append(f"{dotted}: no field {field!r}")
    return problems


def function_source(tree: SourceTree, dotted: str) -> str:
    found = tree.resolve(dotted)
    if found is None or found[0] != "function":
        raise LookupError(f"{dotted} is not a function in {tree.root}")
    return ast.unparse(found[1])


# ---- TensorRT: names registered by the compiled bindings ----------------------------------


class ElfStrings:
    """NUL-terminated strings of an x86-64 ELF shared object that its code or data points at."""

    def __init__(self, data: bytes) -> None:
        if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1 or struct.unpack_from("<H", data, 18)[0] != 62:
            raise ValueError("expected a little-endian x86-64 ELF64 shared object")
        self.data = data
        self.segments = self._load_segments()
        self.targets = self._code_targets() | self._relocation_targets()

    def _load_segments(self) -> list[tuple[int, int, int, int]]:
        phoff = struct.unpack_from("<Q", self.data, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", self.data, 0x36)
        segments = []
        for i in range(phnum):
            p_type, p_flags, p_offset, p_vaddr, _, p_filesz = struct.unpack_from(
                "<IIQQQQ", self.data, phoff + i * phentsize
            )
            if p_type == 1:  # PT_LOAD
                segments.append((p_offset, p_vaddr, p_filesz, p_flags))
        return segments

    def _code_targets(self) -> set[int]:
        """Addresses loaded by ``lea reg, [rip + disp32]`` in executable segments."""
        pattern = re.compile(rb"[\x48\x49\x4c\x4d]\x8d[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]")
        targets = set()
        for offset, vaddr, size, flags in self.segments:
            if flags & 1:
                for match in pattern.finditer(self.data, offset, offset + size):
                    disp = struct.unpack_from("<i", self.data, match.start() + 3)[0]
                    targets.add(vaddr + (match.start() - offset) + 7 + disp)
        return targets

    def _relocation_targets(self) -> set[int]:
        """Addends of R_X86_64_RELATIVE relocations (pointers stored in data, e.g. tables)."""
        shoff = struct.unpack_from("<Q", self.data, 0x28)[0]
        shentsize, shnum = struct.unpack_from("<HH", self.data, 0x3A)
        targets = set()
        for i in range(shnum):
            sh_type, sh_offset, sh_size = [
                struct.unpack_from(f, self.data, shoff + i * shentsize + o)[0]
                for f, o in (("<I", 4), ("<Q", 24), ("<Q", 32))
            ]
            if sh_type == 4:  # SHT_RELA
                for entry in range(sh_offset, sh_offset + sh_size, 24):
                    _, info, addend = struct.unpack_from("<QQq", self.data, entry)
                    if info & 0xFFFFFFFF == 8:
                        targets.add(addend)
        return targets

    def _vaddr(self, file_offset: int) -> int | None:
        for offset, vaddr, size, _ in self.segments:
            if offset <= file_offset < offset + size:
                return vaddr + file_offset - offset
        return None

    def occurs(self, name: str) -> bool:
        """The bytes ``name\\0`` occur anywhere (the weak, substring-style test)."""
        return name.encode() + b"\0" in self.data

    def registered(self, name: str) -> bool:
        """``name\\0`` occurs and the code or data points at its first byte."""
        needle = name.encode() + b"\0"
        start = self.data.find(needle)
        while start != -1:
            if self._vaddr(start) in self.targets:
                return True
            start = self.data.find(needle, start + 1)
        return False


def bindings_strings(wheel: Path, directory: Path) -> ElfStrings:
    root = extract(wheel, directory, lambda n: n.endswith(".so"))
    (so,) = [p for p in root.rglob("tensorrt*.so")]
    return ElfStrings(so.read_bytes())


def check_trt(strings: ElfStrings, contract: dict[str, list[str]]) -> list[str]:
    """Names of ``contract`` (classes and members) the bindings do not register."""
    names = sorted({*contract, *(m for members in contract.values() for m in members)})
    return [name for name in names if not strings.registered(name)]


# ---- what the adapter uses ----------------------------------------------------------------

# Variables (or attributes) that hold TensorRT objects in the adapter, by convention.
TRT_RECEIVERS = {
    "engine": "ICudaEngine",
    "context": "IExecutionContext",
    "refitter": "Refitter",
    "runtime": "Runtime",
    "ser_config": "ISerializationConfig",
}
# The same for the export's refit script (trt_subgraph/trt_refit.py), which builds engines too.
REFIT_SCRIPT_RECEIVERS = {
    **TRT_RECEIVERS,
    "builder": "Builder",
    "network": "INetworkDefinition",
    "config": "IBuilderConfig",
    "parser": "OnnxParser",
    "parser_refitter": "OnnxParserRefitter",
}


def _chain(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def adapter_usage(
    path: Path, receivers: dict[str, str] = TRT_RECEIVERS
) -> tuple[dict[str, dict[str, Any]], set[tuple[str, ...]]]:
    """What ``path`` uses: torch_tensorrt dotted names with the arguments passed, and TensorRT names
    (``receivers``: the variable names that hold TensorRT objects, and their classes).

    Returns ({dotted: {"positional": max count, "kwargs": set}}, {(Class,) or (Class, member)}).
    """
    tree = ast.parse(path.read_text())
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    torch_trt: dict[str, dict[str, Any]] = {}
    trt: set[tuple[str, ...]] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Attribute) and not isinstance(parents.get(node), ast.Attribute):
            chain = _chain(node)
            if chain is None:
                if isinstance(node.value, ast.Attribute) and node.value.attr in receivers:
                    trt.add((receivers[node.value.attr], node.attr))
                continue
            if chain[0] == "torch_tensorrt":
                entry = torch_trt.setdefault(".".join(chain), {"positional": 0, "kwargs": set()})
                call = parents.get(node)
                if isinstance(call, ast.Call) and call.func is node:
                    entry["positional"] = max(entry["positional"], len(call.args))
                    entry["kwargs"] |= {k.arg for k in call.keywords}
            elif chain[0] == "trt":
                trt.add(tuple(chain[1:3]))
            elif chain[-2] in receivers:
                trt.add((receivers[chain[-2]], chain[-1]))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "hasattr"
            and len(node.args) == 2
            and isinstance(node.args[1], ast.Constant)
        ):
            chain = _chain(node.args[0])
            if chain and chain[0] == "trt":
                trt.add(tuple([*chain[1:], node.args[1].value][:2]))
    return torch_trt, trt


def usage_problems(
    path: Path, torch_trt_contract: dict[str, dict[str, Any]], trt_contract: dict[str, list[str]]
) -> list[str]:
    """Uses in the adapter that its contract tables do not cover."""
    used_tt, used_trt = adapter_usage(path)
    problems = []
    for dotted, use in sorted(used_tt.items()):
        spec = torch_trt_contract.get(dotted)
        if spec is None:
            problems.append(f"{dotted} is used but not in TORCH_TRT_CONTRACT")
            continue
        if use["positional"] > spec.get("positional", 0):
            problems.append(
                f"{dotted} is called with {use['positional']} positional arguments, "
                f"the contract says {spec.get('positional', 0)}"
            )
        extra = use["kwargs"] - set(spec.get("kwargs", []))
        if None in extra:
            problems.append(f"{dotted} is called with **kwargs, which the contract cannot check")
        if extra - {None}:
            problems.append(f"{dotted} is called with keywords {sorted(extra - {None})} missing from the contract")
    for name in sorted(used_trt):
        if name[0] not in trt_contract or (len(name) == 2 and name[1] not in trt_contract[name[0]]):
            problems.append(f"trt.{'.'.join(name)} is used but not in TRT_CONTRACT")
    return problems


# ---- torch_tensorrt's own lowering on a CPU, with TensorRT stubbed out -------------------------

# A permissive stand-in module: every attribute is a memoized dummy class, enough for imports.
_STUB = """
__version__ = "0.0.0"
_cache = {}


class _Dummy(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _make(cls.__name__ + "." + name)

    def __call__(cls, *args, **kwargs):
        return _make(cls.__name__ + "()")

    def __iter__(cls):
        return iter(())

    def __hash__(cls):
        return hash(cls.__name__)

    def __eq__(cls, other):
        return cls is other

    def __or__(cls, other):
        return cls


def _make(name):
    if name not in _cache:
        _cache[name] = _Dummy(name, (), {})
    return _cache[name]


def __getattr__(name):
    if name.startswith("__") or name == "tensorrt_rtx":  # not the RTX flavour
        raise AttributeError(name)
    return _make(name)


import sys as _sys

tensorrt = _sys.modules[__name__]  # trt.tensorrt.ITensor is trt.ITensor
"""


def write_stubs(directory: Path) -> Path:
    """Stub ``tensorrt`` (and torch_tensorrt's native-only helpers) so its Python code imports."""
    for name in ("tensorrt", "dllist", "psutil"):
        (directory / name).mkdir(parents=True, exist_ok=True)
        (directory / name / "__init__.py").write_text(_STUB)
    return directory


_PROBE = """
import json, torch
# torch_tensorrt asks the GPU for its capability at import; a CPU build of torch has none.
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
torch.cuda.current_device = lambda: 0
torch._C._CudaDeviceProperties = getattr(torch._C, "_CudaDeviceProperties", object)
import contract_tools
print("PROBE" + json.dumps(contract_tools._probe_in_process()))
"""


def lowering_probe(src: Path, stubs: Path) -> dict[str, Any]:
    """The adapter's lowering (torch.export, then torch_tensorrt's front end from ``src``) on every
    instance of a repeated block, in a subprocess with TensorRT stubbed out."""
    path = os.pathsep.join(map(str, [src, stubs, Path(__file__).parent, Path(__file__).resolve().parents[1]]))
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path}
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PROBE")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"lowering probe failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(line[len("PROBE") :])


def _probe_in_process() -> dict[str, Any]:
    import torch
    import torch_tensorrt
    from torch_tensorrt.dynamo.conversion.converter_utils import get_node_name

    import trt_subgraph
    from trt_subgraph.bench import models
    from trt_subgraph.engines.tensorrt import TensorRTEngine

    engine = TensorRTEngine()
    model, inputs = models.build("encoder", depth=3, width=32, seq=8, batch=2)
    result: dict[str, Any] = {"torch_tensorrt": torch_tensorrt.__version__, "subgraphs": {}}
    for unit in trt_subgraph.capture(model, *inputs).unique:
        settings = engine._compilation_settings(torch.device("cuda", 0))
        seen = []
        for weights in unit.instance_weights:
            gm, _ = engine._lowered(unit.sub, list(weights), settings)
            attrs = sorted(n.target for n in gm.graph.nodes if n.op == "get_attr")
            seen.append(
                {
                    "code": gm.code,
                    "names": [get_node_name(n) for n in gm.graph.nodes if n.op in ("call_function", "get_attr")],
                    "values": tuple(float(getattr(gm, t).double().sum()) for t in attrs),
                    "attrs": attrs,
                }
            )
        result["subgraphs"][unit.sub.fingerprint] = {
            "instances": len(seen),
            "identical_graphs": all(s["code"] == seen[0]["code"] for s in seen),
            "identical_names": all(s["names"] == seen[0]["names"] for s in seen),
            "names": seen[0]["names"],
            "attrs": seen[0]["attrs"],
            "distinct_values": len({s["values"] for s in seen}),
            "supported": {
                str(n.target): engine.is_node_supported(n) for n in unit.sub.gm.graph.nodes if n.op == "call_function"
            },
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=default_dir(), help="wheel cache (default %(default)s)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from trt_subgraph.engines import tensorrt as adapter

    wheels = fetch(args.dir)
    status = 0
    for label, wheel in wheels.items():
        print(f"{label}: {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)")
    for tt_label, trt_label in PAIRS:
        root = extract(wheels[tt_label], args.dir, lambda n: n.endswith(".py"))
        problems = check_torch_trt(SourceTree(root), adapter.TORCH_TRT_CONTRACT)
        missing = check_trt(bindings_strings(wheels[trt_label], args.dir), adapter.TRT_CONTRACT)
        print(f"{tt_label}: {problems or 'all declared'}\n{trt_label}: {missing or 'all registered'}")
        status |= bool(problems or missing)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
