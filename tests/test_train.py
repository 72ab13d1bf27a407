"""train.py end to end on the CPU: the loss falls, resume is exact, bad input never loses earlier work,
and 2 gloo ranks under torchrun train like 1 rank."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import checkpoint
import train

ROOT = Path(__file__).resolve().parent.parent


class Killed(BaseException):
    """A crash injected into the run: nothing in train.py catches it, as nothing survives a kill -9."""

CONFIG = """
training:
  train_iters: 12
  logs: {interval: 1}
  validation: {interval: 4, iterations: 1}
  checkpoint: {interval: 3, keep: 2}
  test_iters: 1
batch: {micro_batch_size: 2, sequence_length: 32, batch_size: 4}
data: {format: file, path: DATA, split: [80, 15, 5]}
optimizer:
  learning_rate: {base: 1.0e-2, minimum: 1.0e-3, decay_style: cosine, warmup_iterations: 2}
model:
  base_model:
    tie_word_embeddings: false
    vocab_size: 64
    transformer:
      num_layers: 2
      hidden_size: 32
      num_attention_heads: 4
      head_groups: 2
      ffn_hidden_size: 64
      gated: true
      add_linear_biases: false
      normalization: {type: rms_norm}
      use_rotary_embeddings: true
      rotary: {scaling_type: llama3, original_context_length: 16}
run: {experiment_dir: EXP}
"""


def write_dataset_by_hand(folder: Path) -> Path:
    """200 documents, each a run of consecutive tokens mod 64 (learnable), written byte by byte from
    docs/formats.md's layout with struct (dtype code 8, uint16), not with prepare.py's writer."""
    rng = np.random.default_rng(0)
    docs = [[(start + i) % 64 for i in range(size)] for start, size in zip(rng.integers(0, 64, 200), rng.integers(20, 60, 200))]
    blob = b"".join(struct.pack(f"<{len(d)}H", *d) for d in docs)
    pointers = np.cumsum([0] + [2 * len(d) for d in docs[:-1]]).tolist()
    n = len(docs)
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, n, n + 1)
    idx += struct.pack(f"<{n}i", *map(len, docs)) + struct.pack(f"<{n}q", *pointers) + struct.pack(f"<{n + 1}q", *range(n + 1))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hand.bin").write_bytes(blob)
    (folder / "hand.idx").write_bytes(idx)
    (folder / "dataset.json").write_text(json.dumps({"datasets": [{"prefix": "hand", "weight": 1.0}]}))
    return folder / "dataset.json"


@pytest.fixture
def setup(tmp_path):
    data = write_dataset_by_hand(tmp_path / "data")
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace("DATA", str(data)).replace("EXP", str(tmp_path / "exp")))
    return config, tmp_path / "exp"


def metrics(exp: Path, key: str) -> dict[int, float]:
    lines = [json.loads(l) for l in (exp / "metrics.jsonl").read_text().splitlines()]
    return {l["step"]: l[key] for l in lines if key in l}


def test_tiny_run_learns_and_leaves_everything_behind(setup):
    config, exp = setup
    assert train.main([str(config), "training.train_iters=30", "training.checkpoint.interval=10"]) == 0
    loss = metrics(exp, "loss")
    assert sorted(loss) == list(range(1, 31))
    assert loss[1] > 3.5 and loss[30] < 0.5 * loss[1]  # ln(64) = 4.16 at the start, a learnable stream after
    val = metrics(exp, "val_loss")
    assert sorted(val) == [4, 8, 12, 16, 20, 24, 28, 30] and val[30] < 0.5 * val[4]
    assert list(metrics(exp, "test_loss")) == [30]
    for line in map(json.loads, (exp / "metrics.jsonl").read_text().splitlines()):
        if "loss" in line:
            assert {"lr", "grad_norm", "tokens_per_s"} <= set(line)
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["20", "30"]  # keep: 2
    assert (exp / "config.yaml").exists()
    weights = load_file(exp / "checkpoints" / "30" / "model.safetensors")
    assert "lm_head.weight" in weights and weights["embed_tokens.weight"].shape == (64, 32)


def test_interrupted_run_resumes_exactly(setup, monkeypatch):
    config, exp = setup
    assert train.main([str(config)]) == 0
    reference = {k: metrics(exp, k) for k in ("loss", "grad_norm", "lr", "val_loss", "test_loss")}
    final = load_file(exp / "checkpoints" / "12" / "model.safetensors")
    for p in exp.iterdir():
        os.system(f"rm -rf {p}")

    real = train.lr_at

    def crash_at_step_8(c, step, iters):
        if step == 8:
            raise Killed()
        return real(c, step, iters)

    monkeypatch.setattr(train, "lr_at", crash_at_step_8)
    with pytest.raises(Killed):
        train.main([str(config)])
    assert max(metrics(exp, "loss")) == 7  # it logged steps past its last checkpoint (6)
    monkeypatch.setattr(train, "lr_at", real)
    assert train.main([str(config)]) == 0
    for key, values in reference.items():
        assert metrics(exp, key) == values, key  # the same numbers, bit for bit, with no duplicated lines
    resumed = load_file(exp / "checkpoints" / "12" / "model.safetensors")
    assert all((resumed[k] == v).all() for k, v in final.items())
    # Run again: complete, nothing to do, nothing changed
    assert train.main([str(config)]) == 0
    assert metrics(exp, "loss") == reference["loss"]


def test_checkpoint_half_written_is_never_picked(setup, monkeypatch):
    config, exp = setup
    real = checkpoint.write_file

    def crash_writing_step_9(path, chunks):
        if "tmp-9" in str(path) and "model" in str(path):
            raise Killed()
        return real(path, chunks)

    monkeypatch.setattr(checkpoint, "write_file", crash_writing_step_9)
    with pytest.raises(Killed):
        train.main([str(config)])
    assert (exp / "checkpoints" / ".tmp-9").exists()
    assert checkpoint.checkpoint_steps(exp) == [6, 3]
    monkeypatch.setattr(checkpoint, "write_file", real)
    assert train.main([str(config)]) == 0
    assert sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["12", "9"]


def test_checkpoint_from_another_model_is_refused_and_nothing_changes(setup, capsys):
    config, exp = setup
    assert train.main([str(config), "training.train_iters=3"]) == 0
    before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()}
    code = train.main([str(config), "model.base_model.transformer.hidden_size=48"])
    assert code == 2
    err = capsys.readouterr().err
    assert "was written by a different model" in err and "48" in err
    assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before


def test_damaged_only_checkpoint_is_a_clear_error(setup, capsys):
    from safetensors.torch import save_file

    config, exp = setup
    assert train.main([str(config), "training.train_iters=3"]) == 0
    shard = exp / "checkpoints" / "3" / "optimizer-00000-of-00001.safetensors"
    tensors = load_file(shard)
    del tensors["exp_avg_sq/norm.weight"]
    save_file(tensors, shard)
    before = {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()}
    assert train.main([str(config), "training.train_iters=6"]) == 2
    err = capsys.readouterr().err
    assert f"no usable checkpoint in {exp / 'checkpoints'}" in err and str(shard) in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in exp.rglob("*") if p.is_file()} == before


def test_missing_dataset_is_a_clear_error_and_writes_nothing(setup, capsys):
    config, exp = setup
    assert train.main([str(config), f"data.path={exp.parent / 'nope.json'}"]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert not exp.exists()


def test_validation_on_an_empty_split_is_refused(setup, capsys):
    config, exp = setup
    assert train.main([str(config), "data.split=[1, 0, 0]"]) == 2
    assert "validation split" in capsys.readouterr().err and not exp.exists()


@pytest.mark.parametrize("triton", ["missing", "cpu"])
def test_fused_cross_entropy_where_it_cannot_run_is_a_clear_error(setup, capsys, monkeypatch, triton):
    import kernels
    import model

    config, exp = setup
    if triton == "missing":
        monkeypatch.setattr(model, "kernels", None)  # as on a machine without Triton
    else:
        monkeypatch.setattr(kernels, "INTERPRETED", False)  # as on a CPU without Triton's interpreter
    assert train.main([str(config), "model.base_model.cross_entropy_impl=fused"]) == 2
    err = capsys.readouterr().err
    assert "cross_entropy_impl is `fused`" in err and ("not installed" if triton == "missing" else "on cpu") in err
    assert not exp.exists()
    assert train.main([str(config), "model.base_model.cross_entropy_impl=auto", "training.train_iters=1"]) == 0


def test_float8_on_a_gpu_without_float8_tensor_cores_is_a_clear_error(setup, monkeypatch):
    config, exp = setup
    monkeypatch.setattr(train.torch.cuda, "get_device_capability", lambda device: (8, 0))
    monkeypatch.setattr(train.torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    c = train.load_config(str(config), ["model.distributed.float8_matmuls=true"])
    with pytest.raises(train.ConfigError, match="needs float8 tensor cores .* A100-SXM4-80GB has none: set it false"):
        train.Trainer(c, 0, 1, train.torch.device("cuda"))
    assert not exp.exists()


def test_continuing_from_a_transformers_model_starts_at_its_loss(setup, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from data import Data, DataConfig

    config, exp = setup
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    reference = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=False, max_position_embeddings=32,
    ))
    reference.save_pretrained(tmp_path / "hf")
    # The architecture comes from config.json alone: the YAML's model section goes.
    text = config.read_text()
    config.write_text(text[: text.index("model:")] + text[text.index("run:"):] + f"pretrained: {{path: {tmp_path / 'hf'}}}\n")
    assert train.main([str(config), "training.train_iters=1", "training.validation.interval=null", "training.test_iters=0"]) == 0
    tokens = Data(DataConfig(path=str(tmp_path / "data" / "dataset.json"), split=[80, 15, 5]), 32, 64).samples("train", 0, 4)
    with torch.no_grad():
        logits = reference(tokens[:, :-1]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).item()
    assert metrics(exp, "loss")[1] == pytest.approx(expected, abs=1e-5)


def test_demo_pipeline_exports_a_model_that_transformers_generates_with(tmp_path):
    """README's demo, shortened: prepare the Shakespeare dataset, train config/tiny.yaml, load the
    export with the Auto classes and generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = subprocess.run([sys.executable, "prepare.py", "--demo", "--output", str(tmp_path / "demo")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    exp = tmp_path / "exp"
    assert train.main([str(ROOT / "config" / "tiny.yaml"), f"data.path={tmp_path / 'demo' / 'fast_llm_dataset.json'}",
                       f"run.experiment_dir={exp}", "training.train_iters=6", "training.export.interval=6",
                       "training.validation.interval=null", "training.test_iters=0", "training.checkpoint.interval=null"]) == 0
    folder = exp / "export" / "llama" / "6"
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    prompt = tokenizer("ROMEO.", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 12
    assert tokenizer.decode(generated[0]).replace("<|begin_of_text|>", "").startswith("ROMEO.")
    assert tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:])  # new text, whatever 6 steps taught it
    # What transformers computes from the export is what our model computes from the same weights.
    import export
    from model import Llama

    with torch.device("meta"):
        ours = Llama(train.load_config(str(ROOT / "config" / "tiny.yaml"), []).model.base_model, 128)
    ours.init_weights("cpu")
    export.load_llama_weights(ours, folder)
    with torch.no_grad():
        torch.testing.assert_close(ours(prompt["input_ids"]), model(**prompt).logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Several processes: torchrun with gloo on the CPU


def torchrun(nproc: int, config: Path, *overrides: str, script: str = "train.py", returncode: int = 0):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, str(config), *overrides]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert (out.returncode == 0) == (returncode == 0), out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.parametrize("stage", [1, 2])
def test_two_ranks_train_like_one(setup, stage, tmp_path):
    config, exp = setup
    common = ["training.train_iters=6", "training.test_iters=0", f"model.multi_stage.zero_stage={stage}"]
    assert train.main([str(config), *common]) == 0
    torchrun(2, config, *common, f"run.experiment_dir={tmp_path / 'two'}")
    one, two = metrics(exp, "loss"), metrics(tmp_path / "two", "loss")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (one, two)
    a = load_file(exp / "checkpoints" / "6" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoints" / "6" / "model.safetensors")
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)
    assert len(list((tmp_path / "two" / "checkpoints" / "6").glob("optimizer-*-of-00002.safetensors"))) == 2


def test_resume_from_two_ranks_onto_one(setup, tmp_path):
    config, exp = setup
    common = ["training.test_iters=0", "model.multi_stage.zero_stage=2"]
    assert train.main([str(config), *common]) == 0  # the reference: 12 steps on one rank
    two = tmp_path / "two"
    torchrun(2, config, *common, "training.train_iters=6", "optimizer.learning_rate.decay_iterations=12", f"run.experiment_dir={two}")
    assert train.main([str(config), *common, "optimizer.learning_rate.decay_iterations=12", f"run.experiment_dir={two}"]) == 0
    one, resumed = metrics(exp, "loss"), metrics(two, "loss")
    assert sorted(resumed) == list(range(1, 13))
    assert all(abs(one[s] - resumed[s]) < 1e-5 for s in one), (one, resumed)


@pytest.mark.gpu
def test_bf16_zero2_on_gpu_learns_the_same_with_kernels_on_and_off(setup, monkeypatch):
    import model

    config, exp = setup
    common = [str(config), "training.train_iters=30", "model.distributed.training_dtype=bf16", "model.multi_stage.zero_stage=2"]
    assert train.main(common) == 0
    monkeypatch.setattr(model, "FORCE_TWINS", True)
    assert train.main(common + [f"run.experiment_dir={exp}-twins"]) == 0
    on, off = metrics(exp, "loss"), metrics(Path(f"{exp}-twins"), "loss")
    assert on[30] < 0.5 * on[1] and off[30] < 0.5 * off[1]
    for step in range(1, 31):  # bf16 rounding differs between kernels and twins, and grows with training
        assert abs(on[step] - off[step]) < (0.02 if step <= 5 else 0.1) * off[step], (step, on[step], off[step])
    assert all(0 < v < 1 for v in metrics(exp, "mfu").values()) and metrics(exp, "memory_gb")
