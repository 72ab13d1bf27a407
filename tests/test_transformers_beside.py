"""transformers beside this project: its `kernels` dependency (Hugging Face's hub kernels, a package named like
our kernels.py) loads from this folder, ours still loads when that package came first, and the demo's export is
read by transformers from this folder. Each check runs in a fresh Python, as a user's script would."""
import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def python(code: str, cwd: Path) -> str:
    """Run `code` with `python -c` in `cwd` (the folder Python puts first on sys.path); its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def hub_version() -> str:
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the `kernels` distribution (Hugging Face's hub kernels) is not installed: requirements-test.txt "
                    "lists it, so that these tests run beside it as a user's environment has it")


def test_transformers_and_its_hub_kernels_work_from_the_project_folder():
    out = python("""
        import kernels, model, torch, transformers
        from transformers.integrations import hub_kernels  # imports `from kernels import CUDAProperties, ...`
        from kernels import CUDAProperties, LayerRepository, get_kernel
        import kernels._internals.layer  # a submodule of the hub package
        assert kernels.__file__.endswith("kernels.py") and model.kernels is kernels and kernels.IGNORE_INDEX == -100
        assert kernels.CUDAProperties is CUDAProperties and callable(kernels.cross_entropy)
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=50)
        logits = transformers.LlamaForCausalLM(config)(torch.tensor([[1, 2, 3]])).logits
        print(kernels.__version__, tuple(logits.shape), hub_kernels.is_kernels_available())
    """, ROOT)
    assert out.split() == [hub_version(), "(1,", "3,", "50)", "True"]


def test_our_kernels_load_when_the_hub_package_was_imported_first(tmp_path):
    hub_version()
    out = python(f"""
        import sys
        import kernels  # from site-packages: this project's folder is not on sys.path yet
        from transformers.integrations import hub_kernels
        sys.path.append({str(ROOT)!r})
        import model
        assert model.kernels is not kernels and model.kernels.__file__ == {str(ROOT / "kernels.py")!r}
        print(type(kernels.CUDAProperties).__name__, model.kernels.IGNORE_INDEX)
    """, tmp_path)
    assert out.split() == ["type", "-100"]


def test_demo_export_is_read_by_transformers_from_the_project_folder(tmp_path):
    """The demo's pipeline, shortened: its dataset, config/tiny.yaml for a few steps with an export, then a
    script in the project folder loads the export and the tokenizer with transformers and compares the logits
    with this project's model read from the run's checkpoint."""
    hub_version()
    run = lambda *args: subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,  # noqa
                                       text=True, timeout=300)
    result = run("prepare.py", "--demo", "--output", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    exp = tmp_path / "exp"
    result = run("train.py", "config/tiny.yaml", f"data.path={tmp_path / 'demo' / 'fast_llm_dataset.json'}",
                 f"run.experiment_dir={exp}", "training.train_iters=4", "training.export.interval=4",
                 "training.checkpoint.interval=4", "training.validation.interval=null", "training.test_iters=0")
    assert result.returncode == 0, result.stderr
    out = python(f"""
        import json, torch, transformers
        from safetensors.torch import load_file
        import export
        from model import Llama
        folder = {str(exp / "export" / "llama" / "4")!r}
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
        ids = tokenizer("Shall I compare thee to a summer's day?", return_tensors="pt")["input_ids"]
        checkpoint = {str(exp / "checkpoints" / "4")!r}
        config = export.model_config_from_dict(json.load(open(checkpoint + "/model_config.json")))
        with torch.device("meta"):
            ours = Llama(config, 128)
        ours.init_weights("cpu").load_state_dict(load_file(checkpoint + "/model.safetensors"), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=0)
        print(type(hf).__name__, ids.shape[1])
    """, ROOT)
    assert out.split()[0] == "LlamaForCausalLM" and int(out.split()[1]) > 5
