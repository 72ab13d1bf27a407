"""Fast-LLM's newer schema (v0.4, 2026) beside the seed's: its 8B recipe in both variants, the same Config and
the same training as the seed recipe, and the keys of real configs, accepted with a warning or refused by name
(docs/schema.md, "Schema generations")."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import prepare
import schema
from helpers import LLAMA_31_8B
from schema import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
SEED, NEWER = ROOT / "config" / "llama3_8b.yaml", ROOT / "config" / "llama3_8b_fast_llm_v0.4.yaml"


def dry_run(config: Path, *overrides: str, world: int = 8) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train.py", str(config), "--dry-run", *overrides], cwd=ROOT,
                          capture_output=True, text=True, env={"WORLD_SIZE": str(world), "PATH": "/usr/bin:/bin"})


def write(tmp_path: Path, raw: dict, name: str = "config.yaml") -> str:
    (tmp_path / name).write_text(yaml.safe_dump(raw))
    return str(tmp_path / name)


def newer(**sections) -> dict:
    """The newer recipe, with these sections in place of its own."""
    return {**yaml.safe_load(NEWER.read_text()), **sections}


# ---------------------------------------------------------------------------------------------
# The recipe's two variants


def test_recipe_with_the_architecture_written_out(tmp_path):
    out = dry_run(NEWER, f"run.experiment_dir={tmp_path / 'exp'}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:3] == ["parameters: 8030261248", "tokens per step: 32768", "accumulation steps: 1"]
    assert not (tmp_path / "exp").exists()


def test_recipe_with_the_architecture_from_a_pretrained_config_json(tmp_path):
    (tmp_path / "Llama-3.1-8B").mkdir()
    (tmp_path / "Llama-3.1-8B" / "config.json").write_text(json.dumps(LLAMA_31_8B))
    raw = newer(pretrained={"format": "llama", "path": str(tmp_path / "Llama-3.1-8B"), "model_weights": False})
    del raw["model"]["base_model"]
    # The published Llama variant writes its evaluator one level short, without a name: read as `validation`.
    raw["training"]["evaluators"] = {"interval": 100, "evaluator": {"type": "loss", "iterations": 25,
                                                                    "dataset_name": "validation"}}
    out = dry_run(Path(write(tmp_path, raw)), f"run.experiment_dir={tmp_path / 'exp'}", world=1)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:3] == ["parameters: 8030261248", "tokens per step: 4096", "accumulation steps: 1"]
    config, written_out = load_config(write(tmp_path, raw), [], 8), load_config(str(NEWER), [], 8)
    assert (config.model.base_model.use_position_embeddings, written_out.model.base_model.use_position_embeddings) \
        == (False, None)  # config.json says false; the recipe leaves it unset: none either way
    config.model.base_model.use_position_embeddings = None
    assert config.model == written_out.model and config.training == written_out.training


def test_the_two_recipes_give_the_same_run():
    """The newer recipe, with the seed's batch written in tokens (4 sequences of 4096 tokens a micro-batch, 15 of
    them a step on each of 8 ranks) and the seed's validation interval, is the seed recipe field by field, but for
    what genuinely differs: the data files, two keys the newer schema doesn't have, and what it always does (the
    documents of a sequence apart, no label for their first tokens, loss-masking spans left out)."""
    overrides = ["data.micro_batch_size=16384", "schedule.depth_first_micro_batches=15",
                 "training.evaluators.validation.interval=1000"]
    seed = dataclasses.asdict(load_config(str(SEED), [], 8))
    ours = dataclasses.asdict(load_config(str(NEWER), overrides, 8))
    assert (ours["data"], ours["training"]["validation"].pop("path")) == (
        {"format": "file", "path": "fast-llm-tutorial/dataset/fast_llm_config_training.yaml",
         "split": [1.0, 0.0, 0.0], "sampling": {"use_loss_masking_spans": True, "ignore_document_starts": True,
                                                 "shuffle": "epoch", "seed": 784569}},
        "fast-llm-tutorial/dataset/fast_llm_config_validation.yaml")
    assert seed["data"]["split"] == [99, 1, 0] and seed["training"]["validation"].pop("path") is None
    seed_model, ours_model = seed["model"]["base_model"], ours["model"]["base_model"]
    assert (seed_model.pop("cross_entropy_impl"), ours_model.pop("cross_entropy_impl")) == ("fused", "auto")
    assert (seed_model.pop("use_position_embeddings"), ours_model.pop("use_position_embeddings")) == (False, None)
    assert (seed["batch"].pop("cross_document_attention"), ours["batch"].pop("cross_document_attention")) == (
        True, False)
    del seed["data"], ours["data"]
    assert ours == seed  # the model, the batches, the learning rates, the intervals, the dtypes, ZeRO


def dataset(folder: Path, seed: int) -> str:
    """A dataset JSON over 120 documents of consecutive tokens mod 64."""
    rng = np.random.default_rng(seed)
    docs = [(start + np.arange(size)) % 64 for start, size in zip(rng.integers(0, 64, 120), rng.integers(10, 50, 120))]
    prepare.write_dataset(folder / "tokens", docs, np.uint16)
    (folder / "dataset.json").write_text(json.dumps({"datasets": [{"prefix": "tokens", "weight": 1.0}]}))
    return str(folder / "dataset.json")


def test_a_tiny_pair_trains_to_the_same_losses(tmp_path):
    """One run per schema through train.py on the CPU, each with its own validation dataset: the same losses."""
    (tmp_path / "train").mkdir(), (tmp_path / "valid").mkdir()
    train_json, valid_json = dataset(tmp_path / "train", seed=0), dataset(tmp_path / "valid", seed=1)
    optimizer = {"learning_rate": {"base": 1e-2, "minimum": 1e-3, "decay_style": "cosine", "warmup_iterations": 2}}
    seed = {
        "training": {"train_iters": 6, "logs": {"interval": 1},
                     "validation": {"interval": 3, "iterations": 2, "path": valid_json}},
        "batch": {"micro_batch_size": 2, "sequence_length": 16, "batch_size": 6, "cross_document_attention": False},
        "data": {"format": "file", "path": train_json, "split": [1, 0, 0],  # what the newer schema always does:
                 "sampling": {"use_loss_masking_spans": True, "ignore_document_starts": True}},
        "optimizer": optimizer,
        "model": {"base_model": {"tie_word_embeddings": False, "vocab_size": 64, "transformer": {
            "num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "head_groups": 2, "kv_channels": 8,
            "ffn_hidden_size": 64, "add_linear_biases": False,
            "rotary_embedding_scale": -9.210340371976184}}},  # -ln(10000)
        "run": {"experiment_dir": str(tmp_path / "seed")}}
    block = {"mixer": {"heads": 4, "head_groups": 2, "head_size": 8, "add_linear_biases": False,
                       "rotary": {"type": "default", "theta": 10000}},
             "mlp": {"intermediate_size": 64, "gated": True, "add_linear_biases": False},
             "normalization": {"type": "rms_norm"}}
    # `type: file` names a Fast-LLM dataset YAML; data.path also reads our dataset JSON, which the pair shares.
    fast_llm = {
        "training": {"train_iters": 6, "logs": {"interval": 1},
                     "evaluators": {"validation": {"type": "loss", "interval": 3, "iterations": 2}}},
        "data": {"micro_batch_size": 32, "maximum_document_length": 16,
                 "datasets": {"training": {"type": "file", "path": train_json},
                              "validation": {"type": "file", "path": valid_json}}},
        "schedule": {"depth_first_micro_batches": 3}, "optimizer": optimizer,
        "model": {"base_model": {"hidden_size": 32, "embeddings": {"vocab_size": 64},
                                 "decoder": {"num_blocks": 2, "block": block}}},
        "run": {"experiment_dir": str(tmp_path / "newer")}}
    configs = [write(tmp_path, seed, "seed.yaml"), write(tmp_path, fast_llm, "newer.yaml")]
    assert dataclasses.replace(load_config(configs[0], []), run=None) == dataclasses.replace(
        load_config(configs[1], []), run=None)
    losses = []
    for config, exp in zip(configs, ("seed", "newer")):
        out = subprocess.run([sys.executable, "train.py", config], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "LLAMA_KERNELS": "0"})
        assert out.returncode == 0, out.stderr
        lines = [json.loads(line) for line in (tmp_path / exp / "metrics.jsonl").read_text().splitlines()]
        losses.append([(line["step"], line.get("loss"), line.get("lr"), line.get("val_loss")) for line in lines])
    assert len(losses[0]) == 8 and sum(v is not None for *_, v in losses[0]) == 2  # 6 steps, 2 validations
    assert losses[0] == losses[1]


# ---------------------------------------------------------------------------------------------
# How the newer keys become ours


def test_the_newer_schemas_defaults_where_they_differ_from_ours(tmp_path):
    config = load_config(write(tmp_path, newer(model={"distributed": {"compute_dtype": "bf16"}})), [])
    m = config.model.base_model
    assert (m.tie_word_embeddings, m.transformer.kv_channels, m.transformer.ffn_hidden_size) == (False, 128, 4096)
    assert (config.batch.sequence_length, config.batch.micro_batch_size, config.batch.batch_size) == (4096, 1, 1)
    # examples/mistral.yaml's evaluator, off (iterations: null), with no validation dataset; a memmap file
    raw = newer(data={"datasets": {"training": {"type": "memmap", "path": "tokens/shard_0.fast_llm_dataset"}}})
    raw["training"]["evaluators"] = {"validation": {"type": "loss", "iterations": None}}
    config = load_config(write(tmp_path, raw), [], 4)
    assert (config.data.path, config.batch.sequence_length, config.batch.batch_size) == (
        "tokens/shard_0.fast_llm_dataset", 2048, 4)
    assert config.training.validation.interval is None


def test_a_micro_batch_of_several_documents_is_several_sequences(tmp_path):
    """Fast-LLM's quick start: 61,440 tokens a micro-batch of documents up to 1024 tokens long."""
    config = load_config(str(NEWER), ["data.micro_batch_size=61440", "data.maximum_document_length=1024",
                                      "schedule.breadth_first_micro_batches=2"], 8)
    assert (config.batch.sequence_length, config.batch.micro_batch_size, config.batch.batch_size) == (1024, 60, 960)


@pytest.mark.parametrize("overrides, message", [
    (["model.base_model.decoder.block.mixer.head_groups=3"],
     "model.base_model.decoder.block.mixer.heads (32) must be a positive multiple of head_groups (3)"),
    (["model.base_model.decoder.num_blocks=ten"], "`model.base_model.decoder.num_blocks` must be int, got 'ten'"),
    (["model.distributed.compute_dtype=fp8"], "model.distributed.compute_dtype `fp8` must be one of"),
    (["model.base_model.decoder.block.mlp.gated=false"],
     "model.base_model.decoder.block.mlp.gated: Llama's MLP is gated"),
    (["training.evaluators.validation.evaluator.iterations=0"],
     "training.evaluators.validation.evaluator.iterations must be at least 1"),
    (["model.base_model.decoder.block.mlp.intermediat_size=5"],
     "unknown key `model.base_model.decoder.block.mlp.intermediat_size`. Did you mean "
     "`model.base_model.decoder.block.mlp.intermediate_size`?"),
    (["model.base_model.decoder.block.mixer.attention_dropout=0"],  # no far-fetched `heads`
     "unknown key `model.base_model.decoder.block.mixer.attention_dropout`.\n"),
    (["model.base_model.decoder.block.mixer.rotary.theta=-5"],
     "`model.base_model.decoder.block.mixer.rotary.theta: -5`: must be positive"),
    (["training.evaluators.validation.evaluator.dataset_name=held_out"],
     "validate on dataset `held_out`, which data.datasets does not define"),
    # Two keys for one of ours: the message names both, and ours.
    (["model.base_model.decoder.block.normalization.epsilon=1.0e-5",
      "model.base_model.head.normalization.epsilon=1.0e-6"],
     "`model.base_model.head.normalization.epsilon` and `model.base_model.decoder.block.normalization.epsilon` both "
     "set `model.base_model.transformer.normalization.epsilon`, to 1e-06 and 1e-05; give them one value"),
    (["batch.sequence_length=2048"], "`data.micro_batch_size` and `batch.sequence_length` both set "
                                     "`batch.sequence_length`, to 4096 and 2048"),
])
def test_messages_name_the_keys_the_user_wrote(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(str(NEWER), overrides, 8)
    text = str(e.value) + "\n"
    assert message in text and len(text.splitlines()) == 2, text
    assert "both set" in message or "transformer" not in text and "num_attention_heads" not in text


# ---------------------------------------------------------------------------------------------
# Keys of real configs: accepted with a warning when they change nothing, refused by name otherwise


@pytest.mark.parametrize("key, value", [
    ("model.base_model.decoder.block.mixer.use_flash_attention", True),
    ("model.base_model.decoder.block.mixer.implementation", "flash"),
    ("model.base_model.decoder.block.mixer.type", "attention"),
    ("model.base_model.decoder.block.mixer.dropout", 0.0),
    ("model.base_model.decoder.block.dropout", 0),
    ("model.base_model.embeddings.dropout", 0.0),
    ("model.distributed.tensor_parallel", 1), ("model.distributed.pipeline_parallel", 1),
    ("model.distributed.sequence_data_parallel", 1), ("model.distributed.sequence_tensor_parallel", False),
    ("model.distributed.timeout", 3600), ("model.distributed.optimization_dtype", "fp32"),
    ("data.truncate_documents", True),
    ("training.num_workers", 8), ("training.timeout", 3600), ("schedule.micro_batch_splits", 2),
])
def test_keys_that_change_nothing_are_accepted_with_one_warning(capsys, key, value):
    config = load_config(str(NEWER), [f"{key}={json.dumps(value)}"], 8)
    assert dataclasses.asdict(config) == dataclasses.asdict(load_config(str(NEWER), [], 8))
    warnings = [line for line in capsys.readouterr().err.splitlines() if key in line]
    assert warnings == [f"warning: `{key}: {value!r}` changes nothing here; ignored"]


def test_keys_the_newer_schema_has_for_what_this_one_does_too(capsys, tmp_path):
    """data.seed and data.shuffle (data.sampling's here), the mixer's cross_document_attention (the batch's here),
    a window as long as the sequences, and the datasets' names before 2025-03."""
    overrides = ["data.seed=7", "data.shuffle=disabled", "model.base_model.decoder.block.mixer.window_size=4096",
                 "model.base_model.decoder.block.mixer.cross_document_attention=true"]
    config = load_config(str(NEWER), overrides, 8)
    assert (config.data.sampling.seed, config.data.sampling.shuffle, config.batch.cross_document_attention) == (
        7, "disabled", True)
    assert "window_size: 4096` is at least batch.sequence_length (4096): changes nothing here" in capsys.readouterr().err
    early = yaml.safe_load(SEED.read_text())  # the seed recipe's generation, with named datasets as in early 2025
    del early["data"]["path"], early["data"]["split"]
    early["data"]["datasets"] = {"Training": {"type": "file", "path": "train.yaml"},
                                 "Validation": {"type": "file", "path": "valid.yaml"}}
    config = load_config(write(tmp_path, early), [], 8)
    assert (config.data.path, config.training.validation.path) == ("train.yaml", "valid.yaml")
    assert config.batch.cross_document_attention and not config.data.sampling.ignore_document_starts  # as then
    assert "`data.datasets.Training`: Fast-LLM's name before 2025-03, read as `training`" in capsys.readouterr().err


def test_the_seed_schemas_keys_of_that_kind_too(capsys):
    keys = ["model.base_model.transformer.use_flash_attention=true", "model.base_model.transformer.attention_dropout=0",
            "model.base_model.transformer.hidden_dropout=0.0", "model.distributed.tensor_parallel=1"]
    assert load_config(str(SEED), keys, 8) == load_config(str(SEED), [], 8)
    assert capsys.readouterr().err.count("changes nothing here; ignored") == 4


@pytest.mark.parametrize("override, message", [
    ("model.base_model.decoder.block.mixer.dropout=0.1", "dropout is not implemented"),
    ("model.base_model.decoder.block.dropout=0.1", "dropout is not implemented"),
    ("model.base_model.transformer.attention_dropout=0.1", "dropout is not implemented"),
    ("model.distributed.tensor_parallel=2", "`model.distributed.tensor_parallel: 2` can't be matched: only data "
     "parallelism is implemented"),
    ("model.distributed.pipeline_parallel=4", "only data parallelism is implemented"),
    ("model.distributed.sequence_data_parallel=2", "only data parallelism is implemented"),
    ("model.distributed.sequence_tensor_parallel=true", "sequence parallelism is not implemented"),
    ("model.multi_stage.zero_stage=3", "zero_stage must be 1 or 2 (3, which shards the weights too, is not"),
    ("model.base_model.decoder.block.mixer.window_size=1024", "sliding-window attention is not implemented; a "
     "window of at least batch.sequence_length (4096) tokens is full attention"),
    ("model.base_model.decoder.block.mixer.rotary.type=yarn", "rotary.type: 'yarn'`: Llama's rotary embeddings are "
     "default, or llama3"),
    ("model.base_model.decoder.block.mlp.type=moe", "a block is attention and a dense MLP here"),
    ("model.base_model.decoder.block.mlp.add_linear_biases=true",
     "`model.base_model.decoder.block.mlp.add_linear_biases` and `model.base_model.decoder.block.mixer.add_linear"
     "_biases` both set `model.base_model.transformer.add_linear_biases`, to True and False"),
    ("model.distributed.optimization_dtype=bf16", "master weights and optimizer state are float32 here"),
    ("data.truncate_documents=false", "padding is not implemented"),
    ("data.maximum_document_length=1000", "maximum_document_length a divisor of micro_batch_size if smaller"),
    ("data.micro_batch_size=0", "`data.micro_batch_size: 0`"),
    ("training.evaluators.validation.evaluator.type=lm_eval", "only the validation loss (type loss)"),
    ("training.evaluators.fineweb={interval: 10, iterations: 1}", "`training.evaluators`: validation, fineweb: one "
     "evaluator here"),
    ("data.datasets.training={type: blended, datasets: [], weights: []}", "`data.datasets.training`: {'type': "
     "'blended', 'datasets': [], 'weights': []} is not read here; give {type: file, path: X.yaml}"),
])
def test_keys_that_would_change_the_meaning_are_refused_by_name(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(str(NEWER), [override], 8)
    assert message in str(e.value)


def test_one_of_two_keys_that_are_one_setting_here_is_refused(tmp_path):
    raw = newer()
    del raw["model"]["base_model"]["head"]
    with pytest.raises(ConfigError, match="`model.base_model.decoder.block.normalization.epsilon` and "
                                          "`model.base_model.head.normalization.epsilon`: this model has one setting"):
        load_config(write(tmp_path, raw), ["model.base_model.decoder.block.normalization.epsilon=1e-6"])


def test_a_null_section_under_newer_keys_is_an_empty_one_and_a_scalar_is_refused(tmp_path):
    """The newer schema's data.micro_batch_size lands in batch: `batch: null` reads as no batch keys."""
    assert load_config(write(tmp_path, newer(batch=None)), [], 8).batch == load_config(str(NEWER), [], 8).batch
    with pytest.raises(ConfigError, match="`batch` must be a mapping of keys, got 5"):
        load_config(write(tmp_path, newer(batch=5)), [], 8)


def test_a_refusal_exits_2_with_one_paragraph_and_writes_nothing(tmp_path):
    out = dry_run(NEWER, f"run.experiment_dir={tmp_path / 'exp'}", "model.distributed.tensor_parallel=2",
                  "model.base_model.decoder.block.mixer.dropout=0.1", "data.truncate_documents=false")
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: invalid configuration:") and len(out.stderr.splitlines()) == 4
    assert not (tmp_path / "exp").exists()
    out = subprocess.run([sys.executable, "train.py", str(NEWER), f"run.experiment_dir={tmp_path / 'exp'}",
                          "model.distributed.pipeline_parallel=2"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "pipeline_parallel: 2` can't be matched" in out.stderr
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("name, dtype", [("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16"),
                                         ("float16", "float16"), ("fp32", "float32"), ("float32", "float32")])
@pytest.mark.parametrize("key", ["model.distributed.training_dtype", "model.distributed.compute_dtype"])
def test_dtype_names(key, name, dtype):
    config = load_config(str(NEWER if "compute" in key else SEED), [f"{key}={name}"], 8)
    assert str(schema.TRAINING_DTYPES[config.model.distributed.training_dtype]) == f"torch.{dtype}"
