# Source this before `trt-subgraph bench` on a machine whose Python packages ship without
# bytecode (the project's GPU machine: no .pyc files, PYTHONDONTWRITEBYTECODE=1). It compiles the
# standard library, torch and the packages a compile imports into /tmp/pyc, as `pip install`
# does beside the sources by default, and points every later process there. Without it each
# process compiles those sources again: `import torch, torch._inductor.compile_fx, triton` took
# 10.2-10.8 s instead of 3.8-4.0 s there (RESULTS.md, session 6). Idempotent; about 5 s on 16 cores.
if [ ! -f /tmp/pyc/.done ]; then
  SP=$(python3 -c "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('torch').submodule_search_locations[0]))")
  STD=$(python3 -c "import os;print(os.path.dirname(os.__file__))")
  PYTHONPYCACHEPREFIX=/tmp/pyc python3 -m compileall -q -j 0 "$STD" "$SP"/torch "$SP"/triton "$SP"/sympy "$SP"/mpmath \
    "$SP"/numpy "$SP"/jinja2 "$SP"/markupsafe "$SP"/networkx "$SP"/filelock "$SP"/fsspec "$SP"/typing_extensions.py \
    "$SP"/packaging "$SP"/onnx "$SP"/psutil "$SP"/yaml "$SP"/tqdm "$SP"/_distutils_hack "$SP"/setuptools "$PWD"/trt_subgraph \
    > /tmp/compileall.log 2>&1
  touch /tmp/pyc/.done
fi
export PYTHONPYCACHEPREFIX=/tmp/pyc
