"""Saving a compiled function and loading it without Dynamo: same answers, nothing traced,
split or built, and files that are not exactly what was saved here are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import hf_models
import pytest
import torch
import torch.nn as nn
from compiler_log import compiles, logging_compiler, needs_compiler

import trt_subgraph
from trt_subgraph import _compat, pipeline, runtime, saved
from trt_subgraph.bench import models
from trt_subgraph.engines import inductor
from trt_subgraph.sparsity import prune_2_4

pytestmark = pytest.mark.skipif(
    not hasattr(torch.compiler, "load_compiled_function"), reason="torch without aot_compile (< 2.9)"
)

TIGHT = dict(rtol=1e-5, atol=1e-5)
DECODER = dict(depth=2, width=16, batch=2, seq=8)


@pytest.fixture(autouse=True)
def aot_compile_enabled():
    """torch 2.9 to 2.11 attach ``aot_compile`` only with it set (2.12 on: the default)."""
    from trt_subgraph._compat import aot_compile_enabled

    with aot_compile_enabled():
        yield


def forward(model, *args):
    return model(*args)


def aot_compile(model, inputs, **options):
    options = {"engine": "eager", **options}
    with torch.no_grad():
        compiled = torch.compile(forward, fullgraph=True, backend="trt_subgraph", options=options)
        return compiled.aot_compile(((model, *inputs), {}))


_LOAD = r"""
import json, sys, torch, trt_subgraph
from torch._dynamo.utils import counters
from trt_subgraph import regions
from trt_subgraph.bench import models

calls = {"split": 0, "aot_autograd": 0}
real_split, real_aot = regions.split_module, regions.aot_autograd

def split(*args, **kwargs):
    calls["split"] += 1
    return real_split(*args, **kwargs)

def aot(*args, **kwargs):
    calls["aot_autograd"] += 1
    return real_aot(*args, **kwargs)

regions.split_module, regions.aot_autograd = split, aot
path, how, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model, _ = models.build("decoder", seed=0, **kwargs)  # the saved model's weights
if how == "trt_subgraph.load":
    run = trt_subgraph.load(path, model)
else:
    with open(path, "rb") as f:
        function = torch.compiler.load_compiled_function(f)
    run = lambda *args: function(model, *args)
errors = []
with torch.no_grad():
    for seed in (5, 6):  # fresh inputs, never seen while compiling
        inputs = models.build("decoder", seed=seed, **kwargs)[1]
        errors.append((run(*inputs) - model(*inputs)).abs().max().item())
report = trt_subgraph.last_report()
print("@@" + json.dumps({
    "errors": errors,
    "dynamo_graphs": counters["stats"]["unique_graphs"],
    "calls": calls,
    "totals": report.totals,
    "regions": report.regions,
    "statuses": sorted(s.status for s in report.subgraphs),
}))
"""


def load_in_new_process(path, how, tmp_path, env=None):
    """Load `path` in a fresh interpreter with an empty disk cache (and `env`); what it saw, as a dict."""
    env = {**os.environ, "TRT_SUBGRAPH_CACHE_DIR": str(tmp_path / "empty-cache"), **(env or {})}
    out = subprocess.run(
        [sys.executable, "-c", _LOAD, str(path), how, json.dumps(DECODER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("@@"))
    return json.loads(line[2:])


def test_a_saved_function_loads_in_a_new_process_without_tracing_splitting_or_building(tmp_path):
    model, inputs = models.build("decoder", seed=0, **DECODER)
    compiled = aot_compile(model, inputs, engine="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(model, *inputs), model(*inputs), **TIGHT)
    unique = trt_subgraph.last_report().totals["unique_subgraphs"]
    path = trt_subgraph.save(compiled, tmp_path / "decoder.tsg")

    seen = load_in_new_process(path, "trt_subgraph.load", tmp_path)
    assert max(seen["errors"]) <= 1e-5, seen
    assert seen["dynamo_graphs"] == 0 and seen["calls"] == {"split": 0, "aot_autograd": 0}, seen
    assert seen["totals"]["builds"] == 0 and seen["totals"]["loads"] == unique, seen
    assert seen["statuses"] == ["loaded"] * unique
    assert seen["regions"]["path"] == "regions" and seen["regions"]["loaded"] is True


_SAVE = r"""
import json, sys, torch, trt_subgraph
from trt_subgraph._compat import aot_compile_enabled
from trt_subgraph.bench import models

def forward(model, *args):
    return model(*args)

model, inputs = models.build("decoder", seed=0, **json.loads(sys.argv[2]))
with aot_compile_enabled(), torch.no_grad():
    compiled = torch.compile(forward, fullgraph=True, backend="trt_subgraph", options={"engine": "inductor"})
    compiled = compiled.aot_compile(((model, *inputs), {}))
trt_subgraph.save(compiled, sys.argv[1])
"""


@needs_compiler
def test_a_load_with_an_empty_inductor_cache_compiles_nothing_not_even_the_vector_isa_checks(tmp_path):
    """The file carries inductor's vector-ISA check programs: a new process with empty caches
    (a new container) runs them to pick its ISA but compiles none, nor any kernel."""
    wrapper = logging_compiler(tmp_path)
    path = tmp_path / "decoder.tsg"
    env = {
        **os.environ,
        "CXX": str(wrapper),
        "CXX_LOG": str(tmp_path / "save.log"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-save"),
        "TRT_SUBGRAPH_CACHE_DIR": str(tmp_path / "save-cache"),
    }
    subprocess.run([sys.executable, "-c", _SAVE, str(path), json.dumps(DECODER)], env=env, check=True, timeout=600)
    assert compiles(tmp_path / "save.log")

    load_env = {"CXX": str(wrapper), "CXX_LOG": str(tmp_path / "load.log")}
    load_env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor-load")  # empty, as in a new container
    seen = load_in_new_process(path, "trt_subgraph.load", tmp_path, env=load_env)
    assert max(seen["errors"]) <= 1e-5, seen
    assert seen["totals"]["builds"] == 0 and set(seen["statuses"]) == {"loaded"}, seen
    assert compiles(tmp_path / "load.log") == []


def test_saved_vector_isa_checks_are_restored_only_where_their_key_is_this_processs(tmp_path, monkeypatch):
    """Check programs of another compiler or torch are ignored (the pick compiles its own)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(_compat, "vec_isa_picked", lambda: False)
    files = inductor._pack_files({"ab/cabc.so": b"\x7fELF check"})
    inductor.restore_saved_vec_isa_checks({"key": "another compiler", "files": files})
    assert not (tmp_path / "inductor").exists()
    inductor.restore_saved_vec_isa_checks({"key": inductor._vec_isa_checks_key(), "files": files})
    assert (tmp_path / "inductor" / "ab" / "cabc.so").read_bytes() == b"\x7fELF check"


def test_a_plan_saved_without_vector_isa_checks_still_loads(tmp_path, monkeypatch):
    """Files saved before saved functions carried the checks have no such field."""
    real = saved._plan_state
    monkeypatch.setattr(
        saved, "_plan_state", lambda *a, **k: {n: v for n, v in real(*a, **k).items() if n != "engine_extras"}
    )
    model = _blocks()
    compiled = aot_compile(model, (torch.randn(3, 16),), engine="inductor")
    run = trt_subgraph.load(trt_subgraph.save(compiled, tmp_path / "blocks.tsg"), model)
    with torch.no_grad():
        fresh = torch.randn(3, 16)
        torch.testing.assert_close(run(fresh), model(fresh), **TIGHT)


def test_save_waits_for_glue_building_in_the_background(tmp_path):
    """With build workers, the glue builds in the background after the first call; a save right
    after it waits for those builds, so that the file holds every engine and a load builds none."""
    model, inputs = models.build("decoder", seed=0, **DECODER)
    compiled = aot_compile(model, inputs, engine="inductor", build_workers=2, background_glue=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(model, *inputs), model(*inputs), **TIGHT)
    report = trt_subgraph.last_report()
    assert "building" in {s.status for s in report.subgraphs}  # the save below comes before the glue
    path = trt_subgraph.save(compiled, tmp_path / "decoder.tsg")

    seen = load_in_new_process(path, "trt_subgraph.load", tmp_path)
    assert max(seen["errors"]) <= 1e-5, seen
    assert seen["totals"]["builds"] == 0 and seen["statuses"] == ["loaded"] * report.totals["unique_subgraphs"], seen


def test_torch_save_compiled_function_and_load_compiled_function_work_too(tmp_path):
    model, inputs = models.build("decoder", seed=0, **DECODER)
    compiled = aot_compile(model, inputs)
    path = tmp_path / "decoder.pt2"
    compiled.save_compiled_function(str(path))

    seen = load_in_new_process(path, "torch.compiler.load_compiled_function", tmp_path)
    assert max(seen["errors"]) <= 1e-5, seen
    assert seen["dynamo_graphs"] == 0 and seen["calls"] == {"split": 0, "aot_autograd": 0}, seen
    # the eager engine persists no artifact: each unique subgraph is made again at the first call
    assert seen["statuses"] == ["built"] * seen["totals"]["unique_subgraphs"]


def test_the_whole_graph_path_round_trips_too(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()  # no repeated blocks
    x = torch.randn(3, 16)
    compiled = aot_compile(model, (x,))
    assert trt_subgraph.last_report().regions == {
        "path": "whole graph",
        "reason": "no repeated blocks",
        "plan": "stored",
    }
    path = trt_subgraph.save(compiled, tmp_path / "mlp.tsg")
    run = trt_subgraph.load(path, model)
    report = trt_subgraph.last_report()
    assert report.regions["path"] == "whole graph" and report.regions["loaded"] is True
    with torch.no_grad():
        fresh = torch.randn(3, 16)
        torch.testing.assert_close(run(fresh), model(fresh), **TIGHT)


def test_a_loaded_function_keeps_the_cudagraph_options_and_batch_padding(tmp_path, monkeypatch):
    """``cudagraph_max_shapes`` and ``cudagraph_sizes`` reach the loaded forward's CUDA graphs. On
    a CPU the forward is made to plan CUDA graphs (never called as such: only its plan is read)."""
    monkeypatch.setattr(runtime, "cudagraph_blocker", lambda inputs: None)
    model, x = _blocks(), torch.randn(3, 16)
    torch._dynamo.mark_dynamic(x, 0)
    options = {"cudagraphs": True, "cudagraph_max_shapes": 3, "cudagraph_sizes": [4, 2]}
    compiled = aot_compile(model, (x,), **options)
    assert trt_subgraph.last_report().cudagraphs == "on (batch padded to 2, 4)"
    path = trt_subgraph.save(compiled, tmp_path / "blocks.tsg")
    assembled = []
    real = pipeline.assemble
    monkeypatch.setattr(
        pipeline, "assemble", lambda *args, **kwargs: assembled.append(real(*args, **kwargs)) or assembled[-1]
    )
    trt_subgraph.load(path, model)
    (forward,) = assembled
    graphed = forward.cudagraph
    assert graphed.max_shapes == 3 and graphed.padding is not None and graphed.padding.sizes == (2, 4)
    assert trt_subgraph.last_report().cudagraphs == "on (batch padded to 2, 4)"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_loaded_function_pads_the_batch_and_replays_cuda_graphs(tmp_path):
    model, x = _blocks().cuda(), torch.randn(3, 16, device="cuda")
    torch._dynamo.mark_dynamic(x, 0)
    options = {"engine": "inductor", "cudagraphs": True, "cudagraph_max_shapes": 3, "cudagraph_sizes": [2, 4]}
    path = trt_subgraph.save(aot_compile(model, (x,), **options), tmp_path / "blocks.tsg")
    run = trt_subgraph.load(path, model)
    assert trt_subgraph.last_report().cudagraphs == "on (batch padded to 2, 4)"
    with torch.no_grad():
        for batch in (2, 3, 3, 4, 3):  # 3 and 4 replay one graph from the second call of 3 on
            fresh = torch.randn(batch, 16, device="cuda")
            torch.testing.assert_close(run(fresh), model(fresh), **TIGHT)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


def _blocks() -> nn.Module:
    """Three identical blocks of parameters only (a saved function takes buffers for activations)."""
    torch.manual_seed(0)
    return nn.Sequential(*(_Block() for _ in range(3))).eval()


def test_a_changed_file_is_refused_before_anything_is_unpickled(tmp_path, monkeypatch):
    model, inputs = models.build("decoder", seed=0, **DECODER)
    path = trt_subgraph.save(aot_compile(model, inputs), tmp_path / "decoder.tsg")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    tampered = tmp_path / "tampered.tsg"
    tampered.write_bytes(bytes(data))

    def never(*args, **kwargs):
        raise AssertionError("an unauthenticated file was unpickled")

    monkeypatch.setattr(torch.compiler, "load_compiled_function", never)
    with pytest.raises(ValueError, match="is not a loadable compiled function: payload checksum mismatch"):
        trt_subgraph.load(tampered, model)
    other_key = tmp_path / "other.key"
    other_key.write_bytes(os.urandom(32))
    other_key.chmod(0o600)
    with pytest.raises(ValueError, match="authentication tag mismatch"):
        trt_subgraph.load(path, model, key_file=other_key)
    with pytest.raises(ValueError, match="not a trt_subgraph cache entry"):
        trt_subgraph.load(_write(tmp_path / "plain.pt", b"\x80\x04not ours"), model)


def _write(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("what", ["torch", "python", "trt_subgraph"])
def test_a_file_saved_with_another_version_is_refused(tmp_path, monkeypatch, what):
    model, inputs = models.build("decoder", seed=0, **DECODER)
    compiled = aot_compile(model, inputs)
    real = saved._environment
    monkeypatch.setattr(saved, "_environment", lambda gpu: {**real(gpu), what: "0.0.1"})
    path = trt_subgraph.save(compiled, tmp_path / "decoder.tsg")
    monkeypatch.setattr(saved, "_environment", real)
    with pytest.raises(ValueError, match=f"{what}: saved with '0.0.1', this process has"):
        trt_subgraph.load(path, model)


class _MutatesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x.mul_(0.5)
            x = torch.tanh(layer(x)) + x
        return x


def test_what_cannot_be_saved_says_why(tmp_path):
    with pytest.raises(TypeError, match=r"expects what torch\.compile"):
        trt_subgraph.save(lambda x: x, tmp_path / "f.tsg")

    torch.manual_seed(0)
    mutating = aot_compile(_MutatesItsInput().eval(), (torch.randn(2, 8),))
    with pytest.raises(
        RuntimeError,
        match=r"cannot be saved: inputs \[\d+\] of a compiled graph \(a region, or the whole graph\) are mutated in place",
    ):
        trt_subgraph.save(mutating, tmp_path / "m.tsg")

    model, inputs = models.build("decoder", seed=0, **DECODER)
    with torch.enable_grad():  # parameters require grad: the gradient path
        graded = torch.compile(forward, fullgraph=True, backend="trt_subgraph", options={"engine": "eager"})
        graded = graded.aot_compile(((model, *inputs), {}))
    with pytest.raises(RuntimeError, match="compiled with gradients enabled"):
        trt_subgraph.save(graded, tmp_path / "g.tsg")
    assert not list(tmp_path.glob("*.tsg")) and not list(tmp_path.glob(".*.tmp"))


def test_weights_of_another_sparsity_pattern_than_the_saved_ones_are_refused(tmp_path, eager_engine_with_2_4_variants):
    model, inputs = models.build("decoder", seed=0, **DECODER)
    for block in model.layers:
        prune_2_4(block)
    path = trt_subgraph.save(aot_compile(model, inputs), tmp_path / "pruned.tsg")
    with torch.no_grad():
        pruned = trt_subgraph.load(path, model)
        torch.testing.assert_close(pruned(*inputs), model(*inputs), **TIGHT)
        dense, _ = models.build("decoder", seed=0, **DECODER)
        with pytest.raises(RuntimeError, match="2:4 sparsity pattern"):
            trt_subgraph.load(path, dense)(*inputs)


def keep_portable_guards(entries):
    """``torch.compiler.keep_portable_guards_unsafe`` (in torch 2.13, not in 2.10), written out as
    the README says for a torch without it: the tensor (not global), shape and global-state guards."""
    return [
        g.guard_type in ("GLOBAL_STATE", "SHAPE_ENV") or (g.guard_type == "TENSOR_MATCH" and not g.is_global)
        for g in entries
    ]


def test_a_hugging_face_llama_round_trips_with_portable_guards(tmp_path):
    """torch cannot save the identity guards Dynamo puts on a transformers model (ID_MATCH); the
    portable guard filter keeps the tensor, shape and global-state guards."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = hf_models.llama(
        vocab_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=None,
        use_cache=False,
    ).eval()

    def hidden(model, ids):
        return model(ids).last_hidden_state

    guard_filter = getattr(torch.compiler, "keep_portable_guards_unsafe", keep_portable_guards)
    options = {"engine": "eager", "guard_filter_fn": guard_filter}
    with torch.no_grad():
        compiled = torch.compile(hidden, fullgraph=True, backend="trt_subgraph", options=options)
        compiled = compiled.aot_compile(((model, torch.randint(0, 128, (2, 8))), {}))
    assert trt_subgraph.last_report().regions["path"] == "regions"
    path = trt_subgraph.save(compiled, tmp_path / "llama.tsg")
    counters.clear()
    run = trt_subgraph.load(path, model)
    with torch.no_grad():
        ids = torch.randint(0, 128, (2, 8))
        torch.testing.assert_close(run(ids), model(ids).last_hidden_state, **TIGHT)
    assert counters["stats"]["unique_graphs"] == 0
    assert trt_subgraph.last_report().regions["loaded"] is True


def test_save_into_a_directory_or_a_missing_one_is_refused(tmp_path):
    model, inputs = models.build("mlp", width=16, batch=2)
    compiled = aot_compile(model.eval(), inputs)
    target = tmp_path / "deploy"
    target.mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory; give the path of the file to write"):
        trt_subgraph.save(compiled, target)
    assert target.is_dir() and not any(target.iterdir())
    with pytest.raises(FileNotFoundError, match=r"the directory .*missing does not exist; create it first"):
        trt_subgraph.save(compiled, target / "missing" / "model.tsg")
    assert not (target / "missing").exists()


def test_what_load_cannot_read_says_what_it_is(tmp_path):
    """A directory, a FIFO (which would block forever), a missing key file and a key file that
    is a directory: each refused at once, naming what is wrong."""
    import threading

    model, inputs = models.build("mlp", width=16, batch=2)
    path = trt_subgraph.save(aot_compile(model.eval(), inputs), tmp_path / "mlp.tsg")
    with pytest.raises(IsADirectoryError, match=r"is a directory; give the path of a file trt_subgraph\.save wrote"):
        trt_subgraph.load(tmp_path, model)
    fifo = tmp_path / "pipe.tsg"
    os.mkfifo(fifo)
    raised = []

    def load_fifo():
        try:
            trt_subgraph.load(fifo, model)
        except Exception as exc:
            raised.append(exc)

    reader = threading.Thread(target=load_fifo, daemon=True)
    reader.start()
    reader.join(30)
    assert not reader.is_alive() and "is not a regular file" in str(raised[0])
    with pytest.raises(FileNotFoundError, match=r"key file .* does not exist; a saved function loads only with"):
        trt_subgraph.load(path, model, key_file=tmp_path / "nowhere.key")
    (tmp_path / "keys").mkdir(mode=0o700)
    with pytest.raises(ValueError, match=r"key file .*keys is refused: it is not a regular file"):
        trt_subgraph.load(path, model, key_file=tmp_path / "keys")


def test_a_load_starts_the_engines_set_up_and_a_compile_does_not(tmp_path, monkeypatch):
    """A load starts the engine's one-time set-up (inductor: torch's and Triton's source hashes,
    Triton's driver) in threads before unpickling, and its loads wait for it; a compile does not
    start it, since the threads would contend with lowering for the GIL."""
    from trt_subgraph.engines.base import Engine

    started = []
    monkeypatch.setattr(Engine, "start_setup", lambda self, devices: started.append((self.name, list(devices))))
    model, inputs = models.build("decoder", seed=0, **DECODER)
    compiled = aot_compile(model, inputs)
    assert started == []
    path = trt_subgraph.save(compiled, tmp_path / "decoder.tsg")
    trt_subgraph.load(path, model)
    assert started == [("eager", ["cpu"])]
