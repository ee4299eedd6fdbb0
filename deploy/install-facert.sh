#!/bin/sh
# Install facert, with the extras named in $1, into /opt/facert: a venv over the image's own Python
# packages (deploy/Dockerfile runs this in NVIDIA's Triton images).
#
# The image's torch (NVIDIA's own build, a version no index serves: e.g. 2.5.0a0+<commit>.nv24.10),
# numpy (< 2: the 2.51 python-backend stub needs it, and TensorRT-LLM pins it) and, beside
# TensorRT-LLM, transformers (which it pins; facert runs on 4.57 and 5.x) are kept as installed: a
# constraints file pins them, so pip resolves facert's dependencies around them instead of
# replacing them.
#
# The venv has no pip of its own (--without-pip: Ubuntu's python3 lacks ensurepip unless python3-venv
# is installed); the image's pip, seen through the system site-packages, installs into the venv
# when run by the venv's python.
set -eu
extras="$1"
python3 -m venv --without-pip --system-site-packages /opt/facert
python3 - > /tmp/facert-keep.txt <<'PY'
import importlib.metadata as md

def installed(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


keep = ["torch", "numpy"] + (["transformers"] if installed("tensorrt_llm") else [])
for name in keep:
    if installed(name):
        print(f"{name}=={installed(name)}")
PY
/opt/facert/bin/python -m pip install --no-cache-dir --constraint /tmp/facert-keep.txt "/src/facert[$extras]"
rm -rf /src/facert /tmp/facert-keep.txt
