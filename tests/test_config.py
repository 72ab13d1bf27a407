"""The YAML schema: every kind of bad input is an error naming the key, raised before anything is written."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from schema import Config, ConfigError, LearningRateConfig, load_config
from train import lr_at

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "config" / "llama3_8b.yaml"


def write(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def error(tmp_path, text: str, overrides=(), world: int = 1) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), list(overrides), world)
    return str(e.value)


def test_seed_recipe_is_the_shared_one_and_loads():
    shared = ROOT.parent / "shared" / "config-llama3_8b.yaml"
    if shared.exists():  # the spec beside the checkout; CI lays it there too
        assert yaml.safe_load(SEED.read_text()) == yaml.safe_load(shared.read_text())
    config = load_config(str(SEED), [], 8)
    t = config.model.base_model.transformer
    assert (t.num_layers, t.hidden_size, t.head_groups, t.kv_channels, t.ffn_hidden_size) == (32, 4096, 8, 128, 14336)
    assert math.exp(-t.rotary_embedding_scale) == pytest.approx(500000.0)
    assert config.optimizer.learning_rate.base == 6e-4 and config.training.train_iters == 100_000


def test_dry_run_prints_the_exact_parameter_count(tmp_path):
    out = subprocess.run([sys.executable, "train.py", str(SEED), "--dry-run", f"run.experiment_dir={tmp_path / 'exp'}"],
                         cwd=ROOT, capture_output=True, text=True, env={"WORLD_SIZE": "8", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "parameters: 8030261248" in out.stdout.splitlines()
    assert "tokens per step: 1966080" in out.stdout and "accumulation steps: 15" in out.stdout
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("text, message", [
    ("training: {train_iters: 10, logz: {interval: 1}}", "unknown key `training.logz`. Did you mean `training.logs`?"),
    ("optimizer: {learning_rate: {bass: 1.0}}", "`optimizer.learning_rate.bass`. Did you mean `optimizer.learning_rate.base`?"),
    ("model: {base_model: {transformer: {num_layer: 2}}}", "Did you mean `model.base_model.transformer.num_layers`?"),
    ("training: {train_iters: ten}", "`training.train_iters` must be int, got 'ten'"),
    ("training: {train_iters: 2.5}", "`training.train_iters` must be int"),
    ("batch: {micro_batch_size: true}", "`batch.micro_batch_size` must be int, got True"),
    ("data: {split: 5}", "`data.split` must be a list"),
    ("data: {split: [1, x, 1]}", "`data.split[1]` must be float"),
    ("training: [1, 2]", "`training` must be a mapping"),
])
def test_types_and_unknown_keys(tmp_path, text, message):
    assert message in error(tmp_path, text)


BASE = """
training: {train_iters: 10}
batch: {batch_size: 8, micro_batch_size: 2, sequence_length: 16}
data: {format: random}
model: {base_model: {transformer: {normalization: {type: rms_norm}, gated: true, use_rotary_embeddings: true}}}
run: {experiment_dir: EXP}
"""


@pytest.mark.parametrize("overrides, message", [
    (["training.train_iters=0"], "training.train_iters is required and must be at least 1, got 0"),
    (["training.logs.interval=-5"], "training.logs.interval must be at least 1"),
    (["training.checkpoint.interval=-1"], "training.checkpoint.interval must be at least 1"),
    (["training.validation.interval=5"], "training.validation.iterations must be at least 1 when validation.interval is set"),
    (["data.split=[1, -1, 0]"], "data.split: [1.0, -1.0, 0.0] must be three non-negative weights"),
    (["data.format=files"], "data.format: 'files' is not one of 'file' (a dataset JSON) or 'random'"),
    (["data.format=file"], "data.path: required when data.format is 'file'"),
    (["optimizer.learning_rate.decay_style=cosin"], "decay_style `cosin` must be one of constant, linear, cosine, power"),
    (["optimizer.beta_2=1.5"], "optimizer.beta_1 and beta_2 must lie in [0, 1)"),
    (["model.base_model.transformer.head_groups=3"], "num_attention_heads (8) must be a positive multiple of head_groups (3)"),
    (["model.base_model.transformer.normalization.type=layer_norm"], "normalization.type `layer_norm`: Llama uses rms_norm"),
    (["model.base_model.transformer.gated=false"], "Llama's MLP is gated"),
    (["model.multi_stage.zero_stage=3"], "model.multi_stage.zero_stage must be 1 or 2"),
    (["model.distributed.training_dtype=fp8"],
     "training_dtype `fp8` must be one of float32, fp32, bf16, bfloat16, float16, fp16"),
    (["training.export.format=gguf"], "training.export.format `gguf` is not supported"),
    (["run.experiment_dir=null"], "run.experiment_dir is required"),
    (["model.base_model.cross_entropy_impl=triton"], "cross_entropy_impl `triton` must be auto, torch or fused"),
    (["model.distributed.float8_matmuls=true", "model.base_model.transformer.ffn_hidden_size=1000"],
     "model.distributed.float8_matmuls needs multiples of 16"),
])
def test_impossible_values(tmp_path, overrides, message):
    assert message in error(tmp_path, BASE, overrides)


def test_every_problem_is_reported_at_once(tmp_path):
    text = error(tmp_path, BASE, ["training.train_iters=0", "optimizer.epsilon=0"])
    assert "train_iters is required and must be at least 1, got 0" in text and "optimizer.epsilon must be positive" in text
    # Unknown keys, wrong types and impossible values, all in one message; a wrong type is not also
    # reported through the default its key kept.
    text = error(tmp_path, BASE, ["training.logz.interval=1", "batch.micro_batch_sise=2", "training.train_iters=ten",
                                  "optimizer.beta_1=high", "optimizer.epsilon=-1", "model.base_model.attention_dropout=0.1"])
    lines = text.splitlines()[1:]
    assert len(lines) == 6, text
    for part in ("unknown key `training.logz`", "Did you mean `batch.micro_batch_size`?", "`training.train_iters` must be int",
                 "`optimizer.beta_1` must be float", "optimizer.epsilon must be positive",
                 "unknown key `model.base_model.attention_dropout`. Known keys"):
        assert sum(part in line for line in lines) == 1, part
    assert "train_iters is required" not in text and "num_attention_heads" not in text  # no far-fetched suggestion


def test_non_finite_numbers_are_refused(tmp_path):
    assert "`optimizer.learning_rate.base` must be a finite number, got nan" in error(
        tmp_path, BASE, ["optimizer.learning_rate.base=.nan"])
    assert "`optimizer.weight_decay` must be a finite number, got inf" in error(tmp_path, BASE, ["optimizer.weight_decay=.inf"])


def test_batch_that_does_not_divide_says_what_fits(tmp_path):
    text = error(tmp_path, BASE, ["batch.batch_size=10", "batch.micro_batch_size=4"], world=2)
    assert "batch.batch_size 10 is not a whole number of micro-batches" in text
    assert "micro_batch_size 4 x 2 rank(s) = 8 sequences" in text
    assert "batch_size values that fit: 8 or 16" in text and "micro_batch_size values that fit: 1, 5" in text
    # the seed recipe on 8 ranks with micro-batch 4 is fine, and with 7 ranks it is not
    load_config(str(SEED), [], 8)
    with pytest.raises(ConfigError, match="batch_size 480 is not a whole number"):
        load_config(str(SEED), [], 7)


def test_required_keys(tmp_path):
    text = error(tmp_path, "data: {format: random}")
    for key in ("training.train_iters is required and must be at least 1, got None", "batch.batch_size is required", "run.experiment_dir is required"):
        assert key in text


def test_overrides_are_validated_like_the_file(tmp_path):
    assert "Did you mean `training.train_iters`" in error(tmp_path, BASE, ["training.train_iter=5"])
    assert "must look like section.key=value" in error(tmp_path, BASE, ["training.train_iters"])
    config = load_config(write(tmp_path, BASE), ["training.train_iters=20", "optimizer.learning_rate.base=1e-3"])
    assert config.training.train_iters == 20 and config.optimizer.learning_rate.base == 1e-3


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"), [])
    with pytest.raises(ConfigError, match="is not valid YAML at line 3, column 1: expected ',' or ']'"):
        load_config(write(tmp_path, "training:\n  train_iters: [1\n"), [])
    with pytest.raises(ConfigError, match=r"the value of command-line override `data.split=\[1, 2` is not valid YAML "
                                          r"at line 1, column 6: expected ',' or ']'"):
        load_config(write(tmp_path, BASE), ["data.split=[1, 2"])


def test_bad_config_exits_2_with_a_message_and_writes_nothing(tmp_path):
    exp = tmp_path / "exp"
    path = write(tmp_path, BASE.replace("EXP", str(exp)) + "optimizer: {weight_decay: -1}\n")
    out = subprocess.run([sys.executable, "train.py", path], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2
    assert "optimizer.weight_decay must not be negative" in out.stderr and "Traceback" not in out.stderr
    assert not exp.exists()


def test_defaults_are_fast_llms():
    c = Config()
    assert (c.batch.sequence_length, c.batch.micro_batch_size, c.data.split) == (2048, 1, [969, 30, 1])
    assert (c.optimizer.weight_decay, c.optimizer.beta_2, c.optimizer.epsilon) == (0.01, 0.999, 1e-8)
    assert c.model.base_model.vocab_size == 49152 and c.model.base_model.transformer.rotary_embedding_scale == -math.log(10000)
    assert c.training.checkpoint.keep == 5 and c.model.multi_stage.zero_stage == 1


# ---------------------------------------------------------------------------------------------
# The learning-rate schedule at chosen steps


def test_warmup_then_cosine():
    c = LearningRateConfig(base=6e-4, minimum=6e-5, decay_style="cosine", decay_iterations=100, warmup_iterations=10)
    assert lr_at(c, 1, 100) == pytest.approx(6e-5)  # first step: base / warmup
    assert lr_at(c, 5, 100) == pytest.approx(3e-4)
    assert lr_at(c, 10, 100) == pytest.approx(6e-4)  # end of warm-up: the peak
    assert lr_at(c, 55, 100) == pytest.approx(6e-5 + 0.5 * 5.4e-4)  # halfway: cos(pi/2) = 0
    assert lr_at(c, 100, 100) == pytest.approx(6e-5)
    assert lr_at(c, 150, 200) == pytest.approx(6e-5)  # past decay_iterations: the floor


@pytest.mark.parametrize("style, power, expected", [
    ("constant", 2.0, 1.0), ("linear", 1.0, 0.55), ("power", 1.0, 0.55), ("cosine", 1.0, 0.55),
    # Fast-LLM raises the progress to decay_power whatever the style: 0.5 ** 2 = 0.25 of the way down
    ("linear", 2.0, 1 - 0.9 * 0.25), ("power", 2.0, 1 - 0.9 * 0.25), ("cosine", 2.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)))])
def test_decay_styles_halfway(style, power, expected):
    c = LearningRateConfig(base=1.0, minimum=0.1, decay_style=style, warmup_iterations=0, decay_power=power)
    assert lr_at(c, 50, 100) == pytest.approx(expected)  # decay_iterations defaults to train_iters
