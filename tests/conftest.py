"""Shared test setup.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before
`kernels.py` defines them, so it is set here, before any test module imports the project.
Tests that need CUDA are marked `gpu` and skipped without one (`pytest -m gpu` on a GPU machine).
"""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
