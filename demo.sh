#!/usr/bin/env bash
# Set up, build the demo dataset from the bundled Shakespeare plays, and train config/tiny.yaml; then draw
# the loss curves (experiments/tiny/metrics.png).
# Extra arguments go to train.py as overrides, e.g.  bash demo.sh training.train_iters=40
source "$(dirname "$0")/scripts/setup.sh" requirements.txt
[ -f data/demo/fast_llm_dataset.json ] || python prepare.py --demo --output data/demo
python train.py config/tiny.yaml "$@"
# The picture needs matplotlib, which training does not: installed here, in the demo's venv.
python -c "import matplotlib" 2>/dev/null || python -m pip install -q "matplotlib>=3.8" \
  || echo "no picture: install matplotlib (pip install matplotlib), then run  python plot.py experiments/tiny"
if python -c "import matplotlib" 2>/dev/null; then python plot.py experiments/tiny; fi
