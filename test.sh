#!/usr/bin/env bash
# Set up and run the test suite (CPU; tests marked `gpu` run only where CUDA is present).
# Extra arguments go to pytest, e.g.  bash test.sh -m gpu
source "$(dirname "$0")/scripts/setup.sh" requirements-test.txt
python -m pytest tests -q "$@"
