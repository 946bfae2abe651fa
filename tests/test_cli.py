"""The ``trt-subgraph`` command line as a user meets it: fast help, quiet pipes, modules in the cwd."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trt_subgraph.cache import DiskCache, default_cache_dir, make_key
from trt_subgraph.cli import build_parser, main
from trt_subgraph.options import Options

SUBCOMMANDS = ("cache", "sparsity", "export", "compare", "bench")

# Runs main(argv) in a fresh interpreter and reports whether torch got imported.
NO_TORCH = """
import json, sys
from trt_subgraph.cli import main
try:
    status = main(json.loads(sys.argv[1]))
except SystemExit as exc:  # --help
    status = exc.code
print("@@", status, "torch" in sys.modules)
"""


def run_cli_process(argv: list[str], **kwargs) -> tuple[int, bool, str]:
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH, json.dumps(argv)], capture_output=True, text=True, timeout=120, **kwargs
    )
    assert proc.returncode == 0, proc.stderr
    *out, last = proc.stdout.strip().splitlines()
    _, status, torch_loaded = last.split()
    return int(status), torch_loaded == "True", "\n".join(out)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        *[[name, "--help"] for name in SUBCOMMANDS],
        *[["cache", name, "--help"] for name in ("ls", "stats", "verify", "clear")],
    ],
)
def test_help_imports_no_torch(argv):
    status, torch_loaded, out = run_cli_process(argv)
    assert status == 0 and "usage: trt-subgraph" in out
    assert not torch_loaded


def test_cache_ls_and_stats_import_no_torch(tmp_path):
    cache = DiskCache(tmp_path / "cache", key_file=tmp_path / "key")
    cache.put(make_key({"k": 0}), b"payload", {"engine": "inductor", "info": {"fingerprint": "e" * 32}})
    env = {**os.environ, "TRT_SUBGRAPH_KEY_FILE": str(tmp_path / "key")}
    for command in ("ls", "stats"):
        status, torch_loaded, out = run_cli_process(["cache", command, "--dir", str(tmp_path / "cache")], env=env)
        assert status == 0 and not torch_loaded
    assert "e" * 32 in run_cli_process(["cache", "ls", "--dir", str(tmp_path / "cache")], env=env)[2]


@pytest.mark.parametrize("command", ["ls", "stats", "verify", "clear"])
def test_cache_takes_the_directory_or_the_remote_cache_not_both(tmp_path, command):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trt_subgraph",
            "cache",
            command,
            "--dir",
            str(tmp_path),
            "--remote",
            "redis://127.0.0.1:1/0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr and "Traceback" not in proc.stderr


def test_importing_the_package_imports_no_torch():
    code = "import sys, trt_subgraph, trt_subgraph.cache; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _parsers(parser: argparse.ArgumentParser, name: str = "trt-subgraph"):
    """(command, parser) for the parser and every subcommand's, recursively."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_help_texts_are_plain_and_show_every_default():
    for command, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert "``" not in text and ":func:" not in text and ":class:" not in text, command
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.option_strings and action.dest != "help" and not action.required:
                shown = formatter._get_help_string(action)
                assert "default" in shown, f"{command} {action.option_strings[0]}: {action.help!r}"


def test_python_dash_m_runs_the_command_line():
    for module in ("trt_subgraph", "trt_subgraph.bench"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("usage: ")
    assert "{cache,sparsity,export,bench}" in proc.stdout or "--backends" in proc.stdout


def test_a_closed_pipe_ends_quietly(tmp_path):
    """``trt-subgraph cache ls | head -1``: the reader goes away, the command says nothing."""
    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "trt_subgraph", "cache", "ls", "--dir", str(tmp_path / "none")],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode in (0, 141)


def test_export_finds_the_model_module_in_the_working_directory(tmp_path, monkeypatch, capsys):
    """A console script starts with its own directory on sys.path, not the cwd."""
    (tmp_path / "my_local_models.py").write_text(
        textwrap.dedent("""
        from trt_subgraph.bench import models

        def make():
            return models.build("mlp", width=16, batch=2)
    """)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != tmp_path])
    monkeypatch.delitem(sys.modules, "my_local_models", raising=False)
    assert main(["export", "--onnx", str(tmp_path / "onnx"), "--model", "my_local_models:make"]) == 0
    assert "unique subgraphs" in capsys.readouterr().out
    assert (tmp_path / "onnx" / "index.json").is_file()
    sys.modules.pop("my_local_models", None)


@pytest.mark.parametrize("command", ["ls", "stats", "verify", "clear"])
def test_cache_dir_that_is_a_file_is_refused(tmp_path, capsys, command):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a cache")
    assert main(["cache", command, "--dir", str(a_file)]) == 2
    assert f"--dir {a_file} is a file, not a cache directory" in capsys.readouterr().err
    assert a_file.read_text() == "not a cache"


def test_export_refuses_an_empty_output_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--onnx", "", "--model", "trt_subgraph.bench.models:build"]) == 2
    assert "--onnx is empty" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written into the current directory


def test_export_bad_arguments_and_failing_factories_exit_2_without_a_traceback(tmp_path, monkeypatch, capsys):
    (tmp_path / "export_factories.py").write_text(
        textwrap.dedent("""
        import torch
        from trt_subgraph.bench import models

        def make():
            return models.build("mlp", width=16, batch=2)

        def boom():
            raise RuntimeError("no model today")

        def oserror():
            open("/nonexistent/weights.bin")

        class Picky(torch.nn.Module):
            def forward(self, x):
                raise ValueError("model forward rejects this")

        def picky():
            return Picky(), (torch.randn(2),)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    onnx = str(tmp_path / "onnx")
    cases = [
        (["--onnx", onnx, "--model", "export_factories:make", "--min-block-size", "0"], "'min_block_size' must be"),
        (["--onnx", onnx, "--model", "export_factories:boom"], "export_factories:boom raised RuntimeError: no model"),
        (["--onnx", str(a_file), "--model", "export_factories:make"], f"--onnx {a_file}: cannot write there"),
        (["--onnx", onnx, "--model", "export_factories:make", "--opset", "99"], "opset must be an int from 13 to"),
        (["--onnx", onnx, "--model", "export_factories:oserror"], "export_factories:oserror raised FileNotFoundError"),
    ]
    for argv, message in cases:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert main(["export", "--onnx", onnx, "--model", "export_factories:picky"]) == 3  # the model failed
    assert "ValueError: model forward rejects this" in capsys.readouterr().err


@pytest.mark.parametrize("xdg", ["relative/xdg", "absolute"])
def test_backend_and_cache_command_agree_on_the_default_cache_dir(tmp_path, monkeypatch, xdg):
    """One definition; a relative XDG_CACHE_HOME is invalid (XDG spec) and ignored by both."""
    monkeypatch.delenv("TRT_SUBGRAPH_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg") if xdg == "absolute" else xdg)
    expected = tmp_path / "xdg" / "trt_subgraph" if xdg == "absolute" else tmp_path / "home" / ".cache" / "trt_subgraph"
    assert default_cache_dir() == expected
    assert Options.from_user({}).cache_dir == expected
    args = build_parser().parse_args(["cache", "ls"])
    assert Path(args.dir) == expected
