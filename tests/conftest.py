"""Shared test setup.

Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before
`kernels.py` defines them, so it is set here, before any test module imports the project.
Tests that need CUDA are marked `gpu` and skipped without one (`pytest -m gpu` on a GPU machine).
"""
import importlib.metadata
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton 3.6's interpreter holds a scalar as a 1-element array and calls int() on it when the
    # scalar bounds a loop (`range(0, V, BLOCK)`); NumPy >= 2.4 refuses int() of a 1-d array.
    # Take the one element instead. Only the interpreter needs this, and only the tests use it.
    import triton.runtime.interpreter as _interpreter

    def _patch_lang_tensor(tensor, scope, _patch=_interpreter._patch_lang_tensor):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    _interpreter._patch_lang_tensor = _patch_lang_tensor

    # Its float32 -> float8 conversion drops the carry of a rounding into the exponent (x.96 * 2^e lands on 2^e, not
    # 2^(e+1)) and rounds half up. The float8 cast kernel (kernels.py) converts float32 values only; let torch round
    # those, to the nearest and ties to even, as the GPU does.
    def _convert_float(data, src, dst, rounding_mode, _convert=_interpreter._convert_float):
        if dst.is_fp8() and src.is_fp32():
            fp8 = {"fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2}[dst.name]
            return torch.from_numpy(data.astype("float32")).to(fp8).view(torch.uint8).numpy()
        return _convert(data, src, dst, rounding_mode)

    _interpreter._convert_float = _convert_float

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def pytest_terminal_summary(terminalreporter):
    """The versions pip chose, after the results (which depend on them: transformers is the reference Llama)."""
    names = ("torch", "triton", "numpy", "transformers", "kernels", "tokenizers", "safetensors")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    terminalreporter.write_line("versions: " + ", ".join(found))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
