#!/usr/bin/env bash
# Creates .venv (once) and installs LiverLesionAI with its test tools.
# torch is pinned to the CPU wheel that lies on this platform's disk; slicer-core pins vtk by ABI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test]" 2>&1 | grep -v -i "warning" || true
.venv/bin/python -c "import torch, vtk, slicer, liverlesionai; print('torch', torch.__version__, '| vtk', vtk.vtkVersion.GetVTKVersion(), '| liverlesionai', liverlesionai.__version__)"
