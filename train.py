"""Pretrain a Llama-3.1 from one YAML file in Fast-LLM's schema.

    python train.py config/tiny.yaml [section.key=value ...] [--dry-run]
    torchrun --nproc_per_node=8 train.py config/llama3_8b.yaml

One step, as the loop below reads: for each micro-batch of this rank's share of the global batch,
forward and backward (the optimizer reduce-scatters gradients as they appear); then the optimizer
clips by the global norm, updates its float32 shard and all-gathers the new weights; then log,
validate, checkpoint and export on their intervals. Everything the run writes lands in
`run.experiment_dir`; a run that finds a complete checkpoint there resumes from it exactly.
"""
import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors import safe_open

import export
from data import IGNORE_INDEX, Data, DataConfig, DataError, Loader
from model import BaseModelConfig, Llama, count_parameters, flops_per_token, fused_cross_entropy_problem
from zero import ZeroAdamW

# ---------------------------------------------------------------------------------------------
# The schema: one dataclass per YAML section (docs/schema.md). `None` marks a required key or "off".


@dataclass
class LogsConfig:
    interval: int = 100  # steps between log lines


@dataclass
class ValidationConfig:
    interval: int | None = None  # steps between validation passes (and one at the end); None: off
    iterations: int | None = None  # global batches per validation pass
    path: str | None = None  # (ours) a dataset file read whole for validation; None: data.path's validation split


@dataclass
class CheckpointConfig:
    interval: int | None = None  # steps between checkpoints, and one at the end; None: off
    keep: int = 5  # newest complete checkpoints kept


@dataclass
class ExportConfig:
    format: str = "llama"  # Hugging Face LlamaForCausalLM folders
    interval: int | None = None  # steps between exports (and one at the end); None: off


@dataclass
class WandbAlertConfig:
    interval: int | None = None  # steps between status alerts (step, loss); None: none
    status_updates: bool | None = None  # alerts when the run starts, ends or fails; default: on if interval is


@dataclass
class WandbConfig:
    entity_name: str | None = None  # the W&B user or team; logging is on when it is set (as in Fast-LLM)
    project_name: str = "fast_llm"  # W&B project
    group_name: str = "default"  # W&B group of runs
    alert: WandbAlertConfig = field(default_factory=WandbAlertConfig)


@dataclass
class TrainingConfig:
    train_iters: int | None = None  # required: optimizer steps in the whole run
    logs: LogsConfig = field(default_factory=LogsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    test_iters: int = 0  # global batches of the test split evaluated once at the end
    max_skipped_steps: int = 5  # (ours) non-finite steps in a row that are skipped; one more stops the run
    export: ExportConfig = field(default_factory=ExportConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases, on when entity_name is set


@dataclass
class BatchConfig:
    micro_batch_size: int = 1  # sequences per forward/backward on one device
    sequence_length: int = 2048  # tokens per sequence
    batch_size: int | None = None  # required: sequences per optimizer step over all ranks


@dataclass
class LearningRateConfig:
    base: float = 1e-4  # peak learning rate
    minimum: float = 0.0  # floor reached at decay_iterations
    decay_style: str = "constant"  # constant, linear, cosine, power
    decay_iterations: int | None = None  # absolute step where decay ends; default train_iters
    warmup_iterations: int = 0  # steps of linear ramp from 0 to base
    decay_power: float = 1.0  # progress ** this in every decay style (Fast-LLM's key; 1: plain)


@dataclass
class OptimizerConfig:
    weight_decay: float = 0.01  # decoupled; none on norm weights
    beta_1: float = 0.9  # first-moment decay
    beta_2: float = 0.999  # second-moment decay
    epsilon: float = 1e-8  # added to the second-moment root
    gradient_norm_clipping: float = 1.0  # max global gradient L2 norm; 0 turns clipping off
    learning_rate: LearningRateConfig = field(default_factory=LearningRateConfig)


@dataclass
class MultiStageConfig:
    zero_stage: int = 1  # 1: optimizer state sharded over ranks; 2: gradients sharded too


@dataclass
class DistributedConfig:
    training_dtype: str = "float32"  # float32 (fp32), bf16 (bfloat16), float16 (fp16); masters stay float32
    float8_matmuls: bool = False  # (ours) the blocks' projections multiply in float8 (kernels.py, README: when)
    seed: int = 1234  # Fast-LLM's key: weight init and every random choice of the run


@dataclass
class ModelConfig:
    base_model: BaseModelConfig = field(default_factory=BaseModelConfig)
    multi_stage: MultiStageConfig = field(default_factory=MultiStageConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class RunConfig:
    experiment_dir: str | None = None  # required: everything the run writes goes here


@dataclass
class PretrainedConfig:
    format: str = "llama"  # a Hugging Face Llama folder
    path: str | None = None  # required: that folder
    model_weights: bool = True  # false: only the architecture from config.json


@dataclass
class Config:
    training: TrainingConfig = field(default_factory=TrainingConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    pretrained: PretrainedConfig | None = None  # start from a Hugging Face Llama


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # Fast-LLM's names and short names
H100_PEAK_FLOPS = 989e12  # dense bf16, the MFU denominator of docs/performance.md


class ConfigError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Reading the YAML: types and unknown keys are checked against the dataclasses, with full key paths


def build(cls, raw, path: str, errors: list[str]):
    """Build dataclass `cls` from the parsed YAML mapping `raw` at key path `path`. Every unknown key and
    wrong type is added to `errors` (its field keeps its default), so that all are reported at once."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"`{path}` must be a mapping of keys, got {raw!r}")
        raw = {}
    hints, names = typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.7)  # only near misses
            near = f"{path}.{close[0]}" if path and close else close[0] if close else None
            hint = f" Did you mean `{near}`?" if near else f" Known keys: {', '.join(names)}."
            errors.append(f"unknown key `{where}`.{hint}")
            continue
        try:
            values[key] = convert(hints[key], value, where, errors)
        except ConfigError as e:
            errors.append(str(e))
    return cls(**values)


def convert(kind, value, path: str, errors: list[str]):
    """Check `value` against the annotation `kind` (int, float, str, bool, list[float], X | None, a dataclass)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None:
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if dataclasses.is_dataclass(kind):
        return build(kind, value, path, errors)
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise ConfigError(f"`{path}` must be a list, got {value!r}")
        return [convert(typing.get_args(kind)[0], v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if typing.get_origin(kind) is dict:  # a mapping passed through as it is
        if not isinstance(value, dict):
            raise ConfigError(f"`{path}` must be a mapping, got {value!r}")
        return value
    if kind is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"`{path}` must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"`{path}` must be a finite number, got {value}")
    return value


def yaml_error(e: yaml.YAMLError, what: str) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return ConfigError(f"{what} is not valid YAML{where}: {getattr(e, 'problem', None) or e}")


def load_config(path: str, overrides: list[str], world_size: int = 1) -> Config:
    """Parse the YAML file, apply `section.key=value` overrides, merge a pretrained config.json under
    the file's own model.base_model keys, build the dataclasses and validate them for `world_size`
    ranks. Raises one ConfigError that lists every problem found."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"config file {path} does not exist")
    except yaml.YAMLError as e:
        raise yaml_error(e, path) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (training, batch, data, ...)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command-line override `{item}` must look like section.key=value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(f"override `{item}`: `{part}` is not a section")
            node = node[part]
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise yaml_error(e, f"the value of command-line override `{item}`") from None
    errors, warnings = [], []
    named = translate(raw, world_size, errors, warnings)  # Fast-LLM's newer keys become ours
    translated = len(errors)  # the messages after these name our keys: they get the user's back
    pretrained = raw.get("pretrained")
    if isinstance(pretrained, dict) and pretrained.get("path"):
        base = pretrained_architecture(pretrained["path"], raw.get("run"))
        own = ((raw.get("model") or {}).get("base_model")) or {}
        raw.setdefault("model", {})
        notes = []
        raw["model"] = dict(raw["model"] or {}, base_model=merge(base, own, "model.base_model", notes))
        if os.environ.get("RANK", "0") == "0":
            for key, mine, theirs in notes:
                print(f"{named.get(key, key)}: {mine!r} from {path} overrides {theirs!r} from "
                      f"{pretrained['path']}/config.json")
    config = build(Config, raw, "", errors)
    # A key whose value had the wrong type kept its default: don't also report that default's value.
    wrong = [e.split("`")[1] for e in errors if e.startswith("`")]
    errors += [e for e in validate(config, world_size) if not any(e.startswith(w) for w in wrong)]
    for ours, theirs in sorted(named.items(), key=lambda item: -len(item[0])):  # the longest first: no prefix slips
        errors[translated:] = [e.replace(ours, theirs) for e in errors[translated:]]
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    if int(os.environ.get("RANK", 0)) == 0:
        print("".join(f"warning: {w}\n" for w in warnings), end="", file=sys.stderr)
    return config


def merge(base: dict, over: dict, path: str, notes: list) -> dict:
    """`base` with `over`'s values on top, recursively; each value that changes one of base's goes in notes."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = merge(base[key], value, f"{path}.{key}", notes)
        else:
            if key in base and base[key] != value:
                notes.append((f"{path}.{key}", value, base[key]))
            out[key] = value
    return out


def validate(c: Config, world_size: int) -> list[str]:
    """What is wrong with values that the types alone don't rule out."""
    t, lr, o, m = c.training, c.optimizer.learning_rate, c.optimizer, c.model.base_model.transformer
    checks = [
        (t.train_iters is None or t.train_iters < 1,
         f"training.train_iters is required and must be at least 1, got {t.train_iters}"),
        (t.logs.interval < 1, "training.logs.interval must be at least 1"),
        (t.validation.interval is not None and t.validation.interval < 1,
         "training.validation.interval must be at least 1 (or null: off)"),
        (t.validation.interval is not None and (t.validation.iterations or 0) < 1,
         "training.validation.iterations must be at least 1 when validation.interval is set"),
        (t.checkpoint.interval is not None and t.checkpoint.interval < 1,
         "training.checkpoint.interval must be at least 1 (or null: off)"),
        (t.checkpoint.keep < 1, "training.checkpoint.keep must be at least 1"),
        (t.test_iters < 0, "training.test_iters must not be negative"),
        (t.max_skipped_steps < 0, "training.max_skipped_steps must not be negative (0: stop at the first)"),
        (t.wandb.entity_name is not None and importlib.util.find_spec("wandb") is None,
         "training.wandb.entity_name is set, so the run logs to Weights & Biases, but the wandb package is not "
         "installed: pip install wandb (WANDB_MODE=offline needs no network), or remove training.wandb"),
        (t.export.format != "llama", f"training.export.format `{t.export.format}` is not supported; use `llama`"),
        (t.export.interval is not None and t.export.interval < 1,
         "training.export.interval must be at least 1 (or null: off)"),
        (c.batch.micro_batch_size < 1, "batch.micro_batch_size must be at least 1"),
        (c.batch.sequence_length < 1, "batch.sequence_length must be at least 1"),
        (c.batch.batch_size is None, "batch.batch_size is required"),
        *((True, message) for message in c.data.errors()),
        (lr.base < 0 or lr.minimum < 0, "optimizer.learning_rate.base and .minimum must not be negative"),
        (lr.decay_style not in SCHEDULES,
         f"optimizer.learning_rate.decay_style `{lr.decay_style}` must be one of {', '.join(SCHEDULES)}"),
        (lr.warmup_iterations < 0, "optimizer.learning_rate.warmup_iterations must not be negative"),
        (lr.decay_power <= 0, "optimizer.learning_rate.decay_power must be positive"),
        (not (0 <= o.beta_1 < 1 and 0 <= o.beta_2 < 1), "optimizer.beta_1 and beta_2 must lie in [0, 1)"),
        (o.epsilon <= 0, "optimizer.epsilon must be positive"),
        (o.weight_decay < 0, "optimizer.weight_decay must not be negative"),
        (o.gradient_norm_clipping < 0, "optimizer.gradient_norm_clipping must not be negative (0: off)"),
        *((True, message) for message in c.model.base_model.errors()),
        (c.model.multi_stage.zero_stage not in (1, 2), "model.multi_stage.zero_stage must be 1 or 2 (3, which shards "
         "the weights too, is not implemented; 2 trains the same model)"),
        (c.model.distributed.training_dtype not in DTYPES,
         f"model.distributed.training_dtype `{c.model.distributed.training_dtype}` must be one of {', '.join(DTYPES)}"),
        (c.model.distributed.float8_matmuls
         and any(n % 16 for n in (m.hidden_size, m.ffn_size, m.head_groups * m.head_dim,
                                  c.batch.micro_batch_size * c.batch.sequence_length)),
         "model.distributed.float8_matmuls needs multiples of 16 (torch._scaled_mm's): transformer.hidden_size, "
         "ffn_hidden_size, head_groups x the head dimension, and batch.micro_batch_size x sequence_length"),
        (c.run.experiment_dir is None, "run.experiment_dir is required"),
        (c.pretrained is not None and (c.pretrained.format != "llama" or not c.pretrained.path),
         "pretrained.format must be `llama` and pretrained.path is required"),
    ]
    errors = [message for failed, message in checks if failed]
    b = c.batch
    if b.batch_size is not None and b.micro_batch_size >= 1 and b.batch_size % (b.micro_batch_size * world_size):
        unit = b.micro_batch_size * world_size
        fits = sorted({max(unit, b.batch_size // unit * unit), (b.batch_size // unit + 1) * unit})
        micro = [d for d in range(1, b.batch_size + 1) if b.batch_size % (d * world_size) == 0]
        errors.append(
            f"batch.batch_size {b.batch_size} is not a whole number of micro-batches: micro_batch_size "
            f"{b.micro_batch_size} x {world_size} rank(s) = {unit} sequences per accumulation step. "
            f"batch_size values that fit: {' or '.join(map(str, fits))}; "
            f"micro_batch_size values that fit: {', '.join(map(str, micro)) or 'none at this number of ranks'}"
        )
    return errors


# ---------------------------------------------------------------------------------------------
# Fast-LLM's newer schema (v0.4, 2026) says the same under other names: the architecture as embeddings /
# decoder.block.{mixer, mlp} / head, micro-batches in tokens, datasets and evaluators by name. `translate`
# rewrites such a file into the schema above before `build` (docs/schema.md, "Schema generations").

B, T, D = "model.base_model.", "model.base_model.transformer.", "model.distributed."
MIXER, MLP, NORM = B + "decoder.block.mixer.", B + "decoder.block.mlp.", "normalization."
RENAMES = {  # a newer key -> ours; two newer keys of one of ours must agree
    D + "compute_dtype": D + "training_dtype", B + "hidden_size": T + "hidden_size",
    B + "tied_embedding_weight": B + "tie_word_embeddings", B + "embeddings.vocab_size": B + "vocab_size",
    B + "embeddings.position_embeddings.enabled": B + "use_position_embeddings",
    B + "decoder.num_blocks": T + "num_layers", MIXER + "heads": T + "num_attention_heads",
    MIXER + "head_groups": T + "head_groups", MIXER + "head_size": T + "kv_channels",
    MIXER + "add_linear_biases": T + "add_linear_biases", MLP + "add_linear_biases": T + "add_linear_biases",
    MLP + "intermediate_size": T + "ffn_hidden_size", MLP + "gated": T + "gated",
    MLP + "activation": T + "activation_type",
    **{f"{B}{part}.{NORM}{key}": f"{T}{NORM}{key}"  # one setting for every norm here
       for part in ("decoder.block", "head") for key in ("type", "epsilon")},
    **{f"{MIXER}rotary.{key}": f"{T}rotary.{key}"
       for key in ("scale_factor", "low_frequency_factor", "high_frequency_factor", "original_context_length")},
}
CHANGES = {  # newer keys (T: Fast-LLM 2025's) written otherwise here: ours, the change, why it may not apply
    **{f"{where}rotary.type": (T + "rotary.scaling_type", {"default": "none", "llama3": "llama3"}.__getitem__,
                               "Llama's rotary embeddings are default, or llama3 with Llama 3.1's scaling")
       for where in (MIXER, T)},
    **{f"{where}rotary.theta": (T + "rotary_embedding_scale", lambda theta: -math.log(theta), "must be positive")
       for where in (MIXER, T)},
}
PAIRS = [(MIXER + "add_linear_biases", MLP + "add_linear_biases"),  # one setting here: set both or neither
         (f"{B}decoder.block.{NORM}epsilon", f"{B}head.{NORM}epsilon")]
NEWER_DEFAULTS = {B + "tied_embedding_weight": False, MIXER + "head_size": 128, MLP + "intermediate_size": 4096}
NO_EFFECT = {path: (values, why) for paths, values, why in [  # Fast-LLM keys that change nothing for a dense Llama
    # trained data-parallel when they hold one of these values (None: any); another value is refused, saying why
    ((D + "tensor_parallel", D + "pipeline_parallel", D + "sequence_data_parallel"), (1,),
     "only data parallelism is implemented"),
    ((D + "sequence_tensor_parallel",), (False,), "sequence parallelism is not implemented"),
    ((B + "embeddings.dropout", B + "decoder.block.dropout", MIXER + "dropout", T + "attention_dropout",
      T + "hidden_dropout"), (0,), "dropout is not implemented"),
    ((MIXER + "window_size", T + "window_size"), (None,), "sliding-window attention is not implemented"),
    ((MIXER + "type", MLP + "type"), ("attention", "mlp"), "a block is attention and a dense MLP here"),
    ((D + "optimization_dtype",), ("float32", "fp32"), "master weights and optimizer state are float32 here"),
    (("data.truncate_documents",), (True,), "documents are cut at sequence boundaries; padding is not implemented"),
    ((MIXER + "use_flash_attention", MIXER + "implementation", T + "use_flash_attention", D + "timeout",
      "training.timeout", "training.num_workers", "data.seed", "data.sampling.seed", "data.gpu", "data.sampling.gpu",
      "schedule.micro_batch_splits"), None, ""),
] for path in paths}
BATCH = ("data.micro_batch_size", "data.maximum_document_length", "schedule.depth_first_micro_batches",
         "schedule.breadth_first_micro_batches")
NEWER = (*BATCH, "schedule", "data.datasets", "training.evaluators", D + "compute_dtype", B + "hidden_size",
         B + "tied_embedding_weight", B + "embeddings", B + "decoder", B + "head")


def flatten(tree, prefix: str = "") -> dict:
    """{dotted key path: value} of the leaves of a YAML mapping (a leaf: anything but a non-empty mapping)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree} if prefix else {}
    return {p: v for key, value in tree.items() for p, v in flatten(value, f"{prefix}.{key}".lstrip(".")).items()}


def unflatten(flat: dict) -> dict:
    tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node[part] if isinstance(node.get(part), dict) else node.setdefault(part, {})
        node[leaf] = value
    return tree


def translate(raw: dict, world_size: int, errors: list[str], warnings: list[str]) -> dict[str, str]:
    """Rewrite, in place, a file's keys of Fast-LLM's newer schema into ours (ours stay as they are). Returns
    {our key path: the path the user wrote}, so that later messages name the user's keys."""
    flat, named = flatten(raw), {}
    newer = any(p.startswith(NEWER) for p in flat)

    def put(path: str, value, source: str):
        if path in flat and flat[path] != value:
            errors.append(f"`{source}` and `{named.get(path, path)}` both set `{path}`, to {value!r} and "
                          f"{flat[path]!r}; give them one value")
        flat[path], named[path] = value, named.get(path, source)

    def take(path: str, default=None):  # remove the value or the mapping at `path` and return it
        sub = {p[len(path) + 1:]: flat.pop(p) for p in list(flat) if p.startswith(path + ".")}
        return flat.pop(path, unflatten(sub) if sub else default)

    if newer and not flat.get("pretrained.path") and not any(p.startswith(T) for p in flat):
        for path, value in NEWER_DEFAULTS.items():  # Fast-LLM's newer defaults where they differ from ours
            if RENAMES[path] not in flat:
                flat.setdefault(path, value)
    errors += [f"`{a}` and `{b}`: this model has one setting for both; set both, or neither"
               for a, b in PAIRS if (a in flat) != (b in flat)]
    for path, value in list(flat.items()):
        if path in RENAMES or path in CHANGES:
            target, change, why = CHANGES.get(path, (RENAMES.get(path), None, ""))
            del flat[path]
            try:
                put(target, change(value) if change else value, path)
            except (ValueError, TypeError, KeyError):
                errors.append(f"`{path}: {value!r}`: {why}")
        elif path in NO_EFFECT:
            (values, why), _ = NO_EFFECT[path], flat.pop(path)
            if values is None or value in values:
                warnings.append(f"`{path}: {value!r}` changes nothing here; ignored")
            else:
                errors.append(f"`{path}: {value!r}` can't be matched: {why}")

    # The batch: on each rank, depth_first x breadth_first micro-batches of micro_batch_size tokens a step. Here:
    # sequences of maximum_document_length tokens (or micro_batch_size), so attention spans no more than there.
    if (sizes := [take(k) for k in BATCH]) != [None] * 4 or (newer and "batch" not in raw):
        tokens, longest, depth, breadth = (d if v is None else v for v, d in zip(sizes, (2048, None, 1, 1)))
        valid = all(type(v) is int and v > 0 for v in sizes if v is not None)
        length = min(tokens, longest or tokens) if valid else 0
        if not length or tokens % length:
            errors.append(f"{', '.join(f'`{k}: {v}`' for k, v in zip(BATCH, sizes) if v is not None)}: these must be "
                          "positive integers, maximum_document_length a divisor of micro_batch_size if smaller")
            put("batch.batch_size", world_size, BATCH[0])  # a stand-in, so that it isn't also reported missing
        else:
            warnings.append(f"`{BATCH[0]}: {tokens}`: sequences of {length} tokens in which documents attend to each "
                            "other (as in the seed schema); Fast-LLM's newer schema keeps them apart")
            put("batch.sequence_length", length, BATCH[1] if length < tokens else BATCH[0])
            put("batch.micro_batch_size", tokens // length, BATCH[0])
            put("batch.batch_size", tokens // length * depth * breadth * world_size, BATCH[0])

    # One loss evaluator becomes training.validation; its dataset, training.validation.path.
    evaluators, validation = take("training.evaluators", {}), None
    if isinstance(evaluators, dict) and ("evaluator" in evaluators or "interval" in evaluators):
        evaluators = {"validation": evaluators}  # the published Llama recipe's form, one level short
    if not isinstance(evaluators, dict) or len(evaluators) > 1:
        names = ", ".join(map(str, evaluators)) if isinstance(evaluators, dict) else evaluators
        errors.append(f"`training.evaluators`: {names}: one evaluator here, the validation loss; keep one")
        evaluators = {}
    for name, spec in evaluators.items():
        where, spec = f"training.evaluators.{name}", dict(spec) if isinstance(spec, dict) else {}
        nested = spec.pop("evaluator") if isinstance(spec.get("evaluator"), dict) else {}
        spec.update(nested)  # the recipe's form nests type, iterations and dataset_name under `evaluator`
        inner = where + ".evaluator" if nested else where
        kind, offset, validation = spec.pop("type", "loss"), spec.pop("offset", 0), spec.pop("dataset_name", name)
        interval, iterations = spec.pop("interval", None), spec.pop("iterations", None)
        errors += [f"unknown key `{where}.{key}`" for key in spec]
        if kind != "loss" or offset != 0:
            errors.append(f"`{where}`: type {kind}, offset {offset}: only the validation loss (type loss) at "
                          "multiples of the interval (offset 0) is implemented")
        if interval is None or iterations is None:  # either one null turns it off
            validation = None
        else:
            put("training.validation.interval", interval, where + ".interval")
            put("training.validation.iterations", iterations, inner + ".iterations")

    # The training dataset becomes data.path (or data.format: random), read whole.
    datasets = take("data.datasets", {})
    if not isinstance(datasets, dict):
        errors.append(f"`data.datasets` must be a mapping of datasets by name, got {datasets!r}")
        datasets = {}
    random_training = isinstance(datasets.get("training"), dict) and datasets["training"].get("type") == "random"
    for name, spec in datasets.items():
        where, kind = f"data.datasets.{name}", spec.get("type") if isinstance(spec, dict) else None
        path = spec.get("path") if kind in ("file", "memmap") and set(spec) == {"type", "path"} else None
        if name not in ("training", validation):
            warnings.append(f"`{where}` is read by no evaluator; ignored")
        elif name == "training" and (kind == "random" or isinstance(path, str)):
            put("data.format", "random" if kind == "random" else "file", where)
            put("data.split", [1.0, 0.0, 0.0], where)
            if path is not None:
                put("data.path", path, where + ".path")
        elif isinstance(path, str):
            put("training.validation.path", path, where + ".path")
        elif kind != "random" or not random_training:
            errors.append(f"`{where}`: {spec} is not read here; give {{type: file, path: X.yaml}} (a dataset file: "
                          "it may blend, slice and concatenate), {type: memmap, path: X}, or {type: random} for both")
    if validation is not None and validation not in datasets:
        errors.append(f"`training.evaluators` validate on dataset `{validation}`, which data.datasets does not define")

    for path in [p for p in flat if p.startswith((B + "embeddings", B + "decoder", B + "head", "schedule"))]:
        if flat.pop(path) not in (None, {}):  # what is left in a newer section, but an empty mapping, is unknown
            parent, _, key = path.rpartition(".")
            known = [k.rpartition(".")[2] for k in (*RENAMES, *NO_EFFECT) if k.startswith(parent + ".")]
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
            errors.append(f"unknown key `{path}`." + (f" Did you mean `{parent}.{close[0]}`?" if close else ""))
    raw.clear()
    raw.update(unflatten(flat))
    return {ours: theirs for ours, theirs in named.items() if ours != theirs}


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule


SCHEDULES = ("constant", "linear", "cosine", "power")


def learning_rate(c: LearningRateConfig, step: int, train_iters: int) -> float:
    """Learning rate of optimizer step `step` (1-based: the first step is 1). Warm-up ramps
    linearly so that step `warmup_iterations` gets `base`; decay then runs to `minimum` at the
    absolute step `decay_iterations` (default train_iters) and stays there."""
    if step <= c.warmup_iterations:
        return c.base * step / c.warmup_iterations
    if c.decay_style == "constant":
        return c.base
    end = c.decay_iterations if c.decay_iterations is not None else train_iters
    # Fast-LLM raises the progress to decay_power in every decay style, linear and cosine included.
    progress = min(1.0, (step - c.warmup_iterations) / max(1, end - c.warmup_iterations)) ** c.decay_power
    if c.decay_style == "cosine":
        return c.minimum + 0.5 * (c.base - c.minimum) * (1 + math.cos(math.pi * progress))
    return c.base + (c.minimum - c.base) * progress


# ---------------------------------------------------------------------------------------------
# Checkpoints: checkpoints/STEP/ holds the model weights (rank 0), each rank's optimizer shard and
# random state, the trainer state, and manifest.json: every file's size and SHA-256, computed while
# the file is written. It is written as checkpoints/.tmp-STEP and renamed once every rank has
# finished, so a run killed mid-write leaves nothing that looks complete. A resume verifies the
# newest checkpoint against its manifest and falls back to an older one if it is damaged.

EXECUTION_ONLY = ("cross_entropy_impl", "recompute_layers")  # model keys a resumed run may change
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


class CheckpointError(Exception):
    """A checkpoint or export that could not be written (a full disk, an I/O error)."""


@dataclass
class TrainerState:
    """Where a run stands, besides its tensors: saved as a checkpoint's trainer.json."""
    step: int = 0  # optimizer steps taken
    consumed: dict[str, int] = field(default_factory=lambda: {"train": 0, "validation": 0})  # samples read
    sequence_length: int = 0  # tokens per sample: the samples, so the data order, depend on it
    world_size: int = 1  # ranks that wrote the optimizer shards
    weights_finite: bool = True  # false: a blown-up run; rotation keeps the newest checkpoint where it is true
    elapsed_s: float = 0.0  # wall-clock seconds of the run so far, over all its resumes
    skipped_in_a_row: int = 0  # non-finite steps skipped since the last good one
    # The log interval so far: loss sum, finite steps, steps, seconds. Kept so that the first line logged
    # after a resume is the one an uninterrupted run logs.
    interval: list[float] = field(default_factory=lambda: [0.0, 0, 0, 0.0])


def write_file(path: Path, chunks) -> dict:
    """Write the byte chunks to `path`, hashing them on the way: the manifest entry of the file."""
    digest, size = hashlib.sha256(), 0
    with path.open("wb") as f:
        for chunk in chunks:
            digest.update(chunk)
            size += f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": size, "sha256": digest.hexdigest()}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_chunks(tensors: dict[str, torch.Tensor]):
    """The safetensors format, one tensor at a time: an 8-byte header length, the JSON header (names,
    dtypes, shapes, byte ranges), the raw little-endian data. One tensor in host memory at a time."""
    tensors, header, offset = dict(sorted(tensors.items())), {}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    yield len(blob).to_bytes(8, "little") + blob
    for t in tensors.values():
        if t.numel():
            yield t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def checkpoint_steps(exp: Path) -> list[int]:
    """Steps of the complete (renamed) checkpoints, newest first."""
    return sorted((int(p.name) for p in (exp / "checkpoints").glob("*") if p.name.isdigit()), reverse=True)


def damage(checkpoint: Path, rank: int, world: int) -> str | None:
    """What is wrong with a checkpoint's files, or None. Every rank checks the sizes; each file's hash is
    checked by one rank (file i by rank i mod world), and the ranks share what they found."""
    problems = []
    try:
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        for i, (name, entry) in enumerate(sorted(manifest.items())):
            path = checkpoint / name
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                problems.append(f"{path} is missing or has the wrong size")
            elif i % world == rank and sha256(path) != entry["sha256"]:
                problems.append(f"{path} does not match its checksum")
        for name in ("trainer.json", "model_config.json"):
            json.loads((checkpoint / name).read_text())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problems.append(f"{checkpoint}: {e}")
    if world > 1:
        found = [None] * world
        dist.all_gather_object(found, problems)
        problems = sorted({p for rank_problems in found for p in rank_problems})
    return "; ".join(problems) or None


def choose_checkpoint(exp: Path, config: Config, rank: int, world: int) -> tuple[Path | None, TrainerState]:
    """The newest checkpoint that is whole and holds finite weights, and its trainer state; warns about
    each one passed over. None if the run has none; a ConfigError if it has some but none can be used."""
    passed = []
    for step in checkpoint_steps(exp):
        checkpoint = exp / "checkpoints" / str(step)
        problem = damage(checkpoint, rank, world)
        if problem is None and not json.loads((checkpoint / "trainer.json").read_text()).get("weights_finite", True):
            problem = f"{checkpoint} holds non-finite weights"
        if problem is None:
            return checkpoint, check_checkpoint(checkpoint, config)
        passed.append(problem)
        if rank == 0:
            print(f"warning: checkpoint {checkpoint} can't be used ({problem}); trying an older one", file=sys.stderr)
    if passed:
        raise ConfigError(f"no usable checkpoint in {exp / 'checkpoints'}: {'; '.join(passed)}. Move that folder "
                          "away to start from scratch.")
    return None, TrainerState(sequence_length=config.batch.sequence_length)


def check_checkpoint(checkpoint: Path, config: Config) -> TrainerState:
    """The checkpoint's trainer state, after checking that it was written by this model."""
    saved = json.loads((checkpoint / "model_config.json").read_text())
    ours = dataclasses.asdict(config.model.base_model)
    for key in EXECUTION_ONLY:
        saved.pop(key, None), ours.pop(key, None)
    if saved != ours:
        diff = [f"{k}: {saved.get(k)!r} there, {ours.get(k)!r} here"
                for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
        raise ConfigError(
            f"{checkpoint} was written by a different model than model.base_model describes "
            f"({'; '.join(diff)}). Use another run.experiment_dir, or the model that wrote it."
        )
    state = TrainerState(**json.loads((checkpoint / "trainer.json").read_text()))
    if state.sequence_length != config.batch.sequence_length:
        raise ConfigError(f"{checkpoint} was trained with batch.sequence_length {state.sequence_length}, "
                          f"not {config.batch.sequence_length}")
    return state


def pretrained_architecture(path: str, run) -> dict:
    """The model.base_model keys of the `pretrained` folder's config.json; taken instead from the run's
    own newest checkpoint when it has one, so that a resume never needs that folder again."""
    exp = run.get("experiment_dir") if isinstance(run, dict) else None
    for step in checkpoint_steps(Path(exp)) if exp else []:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((Path(exp) / "checkpoints" / str(step) / "model_config.json").read_text())
    return export.base_model_dict_from_hf(path)


def all_ok(ok: bool) -> bool:
    """Whether `ok` holds on every rank (a collective: all ranks must call it)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0 if ok else 1], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag)
    return flag.item() == 0


def agree(error: Exception | None, what: str, cleanup=lambda: None) -> None:
    """A collective: if writing `what` failed on any rank, every rank cleans up and raises one CheckpointError."""
    if not all_ok(error is None):
        cleanup()
        raise CheckpointError(f"could not write {what}: {error or 'another rank failed to write'}. Nothing of it "
                              "was kept; the earlier checkpoints are intact.")


def save_checkpoint(exp: Path, model, optimizer, state: TrainerState, config: Config, rank: int, world: int):
    root = exp / "checkpoints"
    tmp, final = root / f".tmp-{state.step}", root / str(state.step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    error = None
    try:
        if rank == 0:
            tmp.mkdir(parents=True)
        barrier()
        tensors = optimizer.sharded_state()
        tensors["rng/cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors["rng/cuda"] = torch.cuda.get_rng_state()
        name = f"optimizer-{rank:05d}-of-{world:05d}.safetensors"
        manifest = {name: write_file(tmp / name, safetensors_chunks(tensors))}
        if rank == 0:
            weights = safetensors_chunks(model.state_dict())
            manifest["model.safetensors"] = write_file(tmp / "model.safetensors", weights)
            for name, text in (("model_config.json", json.dumps(dataclasses.asdict(config.model.base_model), indent=2)),
                               ("config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)),
                               ("trainer.json", json.dumps(dataclasses.asdict(state), indent=2))):
                manifest[name] = write_file(tmp / name, [text.encode()])
    except OSError as e:
        error, manifest = e, {}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, manifest)
        manifest = {k: v for part in gathered for k, v in part.items()}
    remove_tmp = lambda: rank == 0 and shutil.rmtree(tmp, ignore_errors=True)  # noqa: E731
    agree(error, f"checkpoint {final}", remove_tmp)
    if rank == 0:
        try:
            write_file(tmp / "manifest.json", [json.dumps(manifest, indent=1).encode()])
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        except OSError as e:
            error = e
    agree(error, f"checkpoint {final}", remove_tmp)
    if rank == 0:
        rotate(exp, config.training.checkpoint.keep)
    barrier()


def rotate(exp: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and the newest one with finite weights."""
    steps, kept_finite = checkpoint_steps(exp), False
    for i, step in enumerate(steps):
        checkpoint, finite = exp / "checkpoints" / str(step), False  # unreadable: not known to be finite
        with contextlib.suppress(OSError, ValueError, AttributeError):
            finite = json.loads((checkpoint / "trainer.json").read_text()).get("weights_finite", True)
        if i >= keep and (kept_finite or not finite):
            shutil.rmtree(checkpoint, ignore_errors=True)
        kept_finite = kept_finite or finite


def load_checkpoint(checkpoint: Path, optimizer, state: TrainerState, rank: int, world: int) -> None:
    files = sorted(checkpoint.glob("optimizer-*-of-*.safetensors"))
    if len(files) != state.world_size:
        raise ConfigError(f"{checkpoint} should hold {state.world_size} optimizer shards, found {len(files)}")
    shards = [safe_open(f, framework="pt", device="cpu") for f in files]
    try:
        optimizer.load_sharded_state(shards)
    except ValueError as e:  # a foreign optimizer shard
        raise ConfigError(f"{checkpoint}: {e}") from None
    if world == state.world_size:  # the same ranks continue with their own random streams
        own = shards[rank]
        torch.set_rng_state(own.get_tensor("rng/cpu"))
        if torch.cuda.is_available() and "rng/cuda" in own.keys():
            torch.cuda.set_rng_state(own.get_tensor("rng/cuda"))


def cpu_state_dict(model) -> dict[str, torch.Tensor]:
    # Copies: the parameters are views into the optimizer's flat buffers, which safetensors refuses.
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Policies the trainer owns and hands down: weight decay, recomputation


def decays(name: str) -> bool:
    """Which parameters get weight decay: the weight matrices and embeddings, not norm weights or biases."""
    return not name.endswith(("norm.weight", ".bias"))


def recompute_layers(config: Config, device: torch.device) -> int:
    """How many blocks recompute their activations in backward: the configured number, or (null) the fewest
    that let the others keep theirs in the GPU memory left once weights and optimizer are in place. On a GPU,
    a run that can't fit even with recomputation stops here, naming a micro-batch that would fit.

    At the peak, the start of backward, a block that is not recomputed holds `activation_bytes` per token
    (model.py; measured by tests/test_memory.py and on an H200: BENCHMARKS.md), a recomputed one its input.
    Beside them, the workspace: the head's gradient (made in the loss's forward), then the loss's logits
    chunk or one block's backward, whichever is larger; ZeRO-2's float32 staging over several ranks (the
    head's own bucket and two default ones); allocator slack. The first block backward visits is the last:
    recomputing it saves nothing (its activations are rebuilt at the peak), so at least one keeps them."""
    m, b, t = config.model.base_model, config.batch, config.model.base_model.transformer
    if device.type != "cuda":
        return m.recompute_layers or 0
    itemsize = DTYPES[config.model.distributed.training_dtype].itemsize
    world = dist.get_world_size() if dist.is_initialized() else 1
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # PyTorch's cache is reusable
    head = m.vocab_size * t.hidden_size
    staging = 4 * (head + 2**27) if config.model.multi_stage.zero_stage == 2 and world > 1 else 0

    def budget(micro_batch: int) -> tuple[float, int, int]:
        """(memory for the blocks, bytes a kept block holds, bytes a recomputed one holds)"""
        tokens = micro_batch * b.sequence_length
        kept, recomputed = tokens * t.activation_bytes(itemsize), tokens * t.hidden_size * itemsize
        loss = (2**29 + recomputed if m.cross_entropy_impl != "torch"  # kernels.LOGITS_CHUNK_BYTES, grad of hidden
                else 16 * tokens * m.vocab_size)  # the full logits, float32 copies and their gradient
        backward = tokens * itemsize * (t.ffn_size + 2 * t.hidden_size) + 3 * itemsize * t.ffn_size * t.hidden_size
        if config.model.distributed.float8_matmuls:  # gate's and up's output gradients in float8, in both layouts
            backward += tokens * (4 * t.ffn_size + t.hidden_size) + t.ffn_size * t.hidden_size
        return free - head * itemsize - max(loss, backward) - staging - 1e9 - 0.02 * total, kept, recomputed

    def kept_blocks(micro_batch: int) -> int:  # below 1: it doesn't fit even recomputing every block
        room, kept, recomputed = budget(micro_batch)
        return int((room - t.num_layers * recomputed) // (kept - recomputed))

    if kept_blocks(b.micro_batch_size) < 1:
        room, kept, recomputed = budget(b.micro_batch_size)
        fits = [n for n in range(b.micro_batch_size - 1, 0, -1) if kept_blocks(n) >= 1]
        hint = (f"batch.micro_batch_size {fits[0]} would fit (batch.batch_size must stay a whole number of "
                f"micro_batch_size x {world} rank(s))" if fits else "not even micro_batch_size 1 fits")
        raise ConfigError(
            f"batch.micro_batch_size {b.micro_batch_size} does not fit in GPU memory, even with every block "
            f"recomputed: after the weights, the optimizer state and the workspace (the loss, one block's backward, "
            f"allocator slack), {room / 1e9:.1f} GB remain for the blocks, which need {t.num_layers} x "
            f"{recomputed / 1e9:.2f} GB (each block's input) + {(kept - recomputed) / 1e9:.2f} GB (the activations "
            f"of the block in backward). {hint}; more GPUs, which shard the optimizer state, or a shorter "
            f"batch.sequence_length also help.")
    if m.recompute_layers is not None:
        return m.recompute_layers
    return max(0, t.num_layers - kept_blocks(b.micro_batch_size))


# ---------------------------------------------------------------------------------------------
# Distributed helpers (no-ops in one process)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, world: int) -> float:
    if world > 1:
        dist.all_reduce(value)
    return value.item() / world


# ---------------------------------------------------------------------------------------------
# The loop


class Logger:
    """Rank 0 prints, appends JSON lines to metrics.jsonl and hands them to the tracker; other ranks stay quiet."""

    def __init__(self, path: Path, rank: int, keep_until: int, tracker=None):
        self.path, self.rank, self.tracker = path, rank, tracker
        if rank == 0 and path.exists():
            # Drop what an interrupted run logged after the checkpoint this run starts from (everything, for
            # a fresh start), so the file reads as one run; and a line cut short by a crash or a full disk.
            kept = []
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                try:
                    if json.loads(line)["step"] <= keep_until:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    if line.strip():
                        print(f"warning: {path} line {number} is not a whole record (a crash mid-write?); "
                              "dropped", file=sys.stderr)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)

    def __call__(self, text: str, **metrics):
        if self.rank == 0:
            print(text, flush=True)
        if self.rank == 0 and metrics:
            metrics["time"] = round(time.time(), 3)
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            if self.tracker is not None:
                self.tracker.log(metrics)


class Tracker:
    """Weights & Biases, on rank 0, when training.wandb.entity_name is set (as in Fast-LLM): every metrics
    line at its step, and the resolved config. The W&B run id is kept in the experiment folder, so that a
    resume continues the same W&B run. WANDB_MODE=offline works without a network."""

    def __init__(self, config: Config, exp: Path, rank: int):
        c, self.run = config.training.wandb, None
        self.status = c.alert.status_updates if c.alert.status_updates is not None else c.alert.interval is not None
        if rank != 0 or c.entity_name is None:
            return
        import wandb

        id_file = exp / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else os.urandom(8).hex()
        id_file.write_text(run_id)
        self.run = wandb.init(id=run_id, resume="allow", entity=c.entity_name, project=c.project_name,
                              group=c.group_name, name=exp.name, dir=exp, config=dataclasses.asdict(config))
        self.alert("run started", f"{exp}")

    def log(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if k not in ("step", "time")}, step=metrics["step"])

    def alert(self, title: str, text: str, status: bool = False) -> None:
        if self.run is not None and (self.status or status):
            self.run.alert(title=title, text=text)

    def finish(self, how: str) -> None:
        if self.run is not None:
            self.alert(f"run {how.split()[0]}", how)
            self.run.finish()


def clock(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds // 60 % 60):02d}:{int(seconds % 60):02d}"


def check_shared(exp: Path, rank: int, world: int) -> None:
    """Create the experiment folder; with several ranks, check that all of them see it, that is that it
    is on a file system they share (the checkpoints need that), before anything else is written there."""
    created = rank == 0 and not exp.exists()
    if rank == 0:
        exp.mkdir(parents=True, exist_ok=True)
    if world == 1:
        return
    probe = exp / f".shared-{os.getpid()}"
    if rank == 0:
        probe.write_text("")
    names = [probe.name]  # rank 0's (the pid differs between ranks)
    dist.broadcast_object_list(names, src=0)
    if not all_ok((exp / names[0]).exists()):
        if rank == 0:
            probe.unlink()
            if created:
                shutil.rmtree(exp, ignore_errors=True)
        raise ConfigError(f"run.experiment_dir {exp} is not the same folder on every rank: it must be on a file "
                          "system that all nodes share (checkpoints are written by every rank and read back by any)")
    barrier()
    if rank == 0:
        probe.unlink()


@contextlib.contextmanager
def profiled(active: bool):
    """LLAMA_PROFILE=FILE: rank 0 profiles its third step and writes the operations by device time."""
    if not active:
        yield
        return
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        yield
    table = profile.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=60,
                                         max_name_column_width=90)
    Path(os.environ["LLAMA_PROFILE"]).write_text(table)


@torch.no_grad()
def evaluate(model, loader: Loader, iterations: int, world: int, device) -> float:
    """The mean loss over all labelled tokens of the pass, on all ranks."""
    sums = torch.zeros(2, device=device)  # the loss summed over labelled tokens, and their number
    for _ in range(iterations):
        for inputs, labels in loader.next_batch():
            count = (labels != IGNORE_INDEX).sum()
            sums += torch.stack([torch.where(count > 0, model(inputs, labels) * count, 0.0), count.float()])
    if world > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def experiment_dir_problem(exp: Path) -> str | None:
    """Why the run could not write into `exp`, found before anything is written, or None."""
    existing = exp
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"run.experiment_dir {exp}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"run.experiment_dir {exp}: {existing} is not writable (a read-only file system, or permissions)"
    return None


def weights_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class NonFinite(Exception):
    """Too many non-finite steps in a row: exit status 3."""


class Stop:
    """SIGTERM or SIGINT asks the run to stop after the current step, with a checkpoint; another one ends
    the process at once (its default action), leaving the previous checkpoint intact. Signals within half
    a second count as one: a launcher (torchrun, srun) often relays the one it got on top of the original."""

    def __init__(self):
        self.requested = None  # when the first signal came
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in self.previous:
            signal.siginterrupt(sig, False)  # a system call that the signal lands in restarts (gloo, NCCL threads)

    def restore(self):
        """Back to the handlers before: the process outlives the run (tests, or a caller of main())."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.requested is not None and time.time() - self.requested > 0.5:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.requested = self.requested or time.time()


class Trainer:
    """One run. `__init__` builds and checks everything and writes nothing, so that any problem it finds
    leaves earlier work untouched; `train()` is the loop."""

    def __init__(self, config: Config, rank: int, world: int, device: torch.device):
        self.config, self.rank, self.world, self.device = config, rank, world, device
        t, b, m, d = config.training, config.batch, config.model.base_model, config.model.distributed
        self.exp = Path(config.run.experiment_dir)
        if problem := experiment_dir_problem(self.exp):
            raise ConfigError(problem)
        if m.cross_entropy_impl == "fused" and (problem := fused_cross_entropy_problem(device)):
            raise ConfigError(problem)
        if d.float8_matmuls and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ConfigError("model.distributed.float8_matmuls needs float8 tensor cores (compute capability 8.9 or "
                              f"more: H100, H200); {torch.cuda.get_device_name(device)} has none: set it false")
        self.checkpoint, self.state = choose_checkpoint(self.exp, config, rank, world)

        # Model: built on meta, materialized and initialized on the device, the same on every rank.
        torch.manual_seed(config.model.distributed.seed)
        with torch.device("meta"):
            self.model = Llama(m, b.sequence_length, DTYPES[d.training_dtype], d.float8_matmuls)
        self.model.init_weights(device)
        source = f"the initialization (model.base_model.transformer.init_method_std {m.transformer.std})"
        if config.pretrained is not None and config.pretrained.model_weights and self.checkpoint is None:
            export.load_llama_weights(self.model, config.pretrained.path)
            source = f"the weights of pretrained.path {config.pretrained.path}"
            if self.rank == 0:
                print(f"loaded pretrained weights from {config.pretrained.path}")

        seed = config.model.distributed.seed
        self.data = Data(config.data, b.sequence_length, m.vocab_size, seed, self.exp / "cache")
        self.sources = {s: (self.data, s) for s in ("train", "validation", "test")}  # each split's Data and name
        if t.validation.path is not None:  # a dataset of its own, read whole: the train split of a [1, 0, 0] split
            own = dataclasses.replace(config.data, format="file", path=t.validation.path, split=[1, 0, 0])
            try:
                self.sources["validation"] = (Data(own, b.sequence_length, m.vocab_size, seed, self.exp / "cache"),
                                              "train")
            except DataError as e:
                raise DataError(f"training.validation.path {t.validation.path} (the validation dataset): {e}") from None
        for split, wanted, key in (("validation", t.validation.interval is not None, "training.validation is on"),
                                   ("test", t.test_iters > 0, f"training.test_iters is {t.test_iters}")):
            if wanted and self.sources[split][0].num_samples(self.sources[split][1]) == 0:
                raise DataError(f"{key} but the {split} split of data.split {config.data.split} holds no sample")

        c = config.optimizer
        self.optimizer = ZeroAdamW(self.model, betas=(c.beta_1, c.beta_2), eps=c.epsilon, weight_decay=c.weight_decay,
                                   decays=decays, zero_stage=config.model.multi_stage.zero_stage)
        if self.checkpoint:
            load_checkpoint(self.checkpoint, self.optimizer, self.state, rank, world)
            source = f"checkpoint {self.checkpoint}"
        if not weights_finite(self.model):
            raise ConfigError(f"the starting weights hold NaN or infinite values; they come from {source}")
        self.model.recompute_layers = recompute_layers(config, device)  # the one place that sets it
        self.accumulation = b.batch_size // (b.micro_batch_size * world)  # micro-batches per step on each rank
        self.tokens_per_step = b.batch_size * b.sequence_length
        self.flops_per_token = flops_per_token(self.model, b.sequence_length)
        self.stopping = False  # every rank agreed to stop after this step (a signal)

    def train(self) -> None:
        t, b, exp, rank, state = self.config.training, self.config.batch, self.exp, self.rank, self.state
        # Nothing was written until here: every check in __init__ could fail without touching earlier work.
        check_shared(exp, rank, self.world)
        if rank == 0:
            (exp / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(self.config), sort_keys=False))
            rotate(exp, t.checkpoint.keep)  # after a kill between a checkpoint's rename and its rotation
        self.log = Logger(exp / "metrics.jsonl", rank, state.step, Tracker(self.config, exp, rank))
        self.loaders = {s: Loader(*self.sources[s], state.consumed.get(s, 0), b.batch_size, b.micro_batch_size,
                                  rank, self.world, self.device) for s in ("train", "validation")}
        layers = self.config.model.base_model.transformer.num_layers
        self.log(f"{'resuming from ' + str(self.checkpoint) if self.checkpoint else 'starting'}: "
                 f"{count_parameters(self.model):,} parameters, {self.world} rank(s), {self.tokens_per_step:,} "
                 f"tokens per step, {self.accumulation} accumulation steps, "
                 f"{self.model.recompute_layers} of {layers} blocks recomputed in backward",
                 **({"step": state.step, "resumed": True} if self.checkpoint else {}))
        if self.checkpoint:
            self.log_schedule_changes()
        for warning in self.data.warnings:
            self.log(f"warning: {warning}")
        if state.step >= t.train_iters:
            self.log(f"training already complete at step {state.step}")
        # The log interval's partial sums (restored on resume): loss over finite steps, those steps, all
        # steps and their seconds in training steps (for tokens/s); and the wall clock, for the ETA.
        self.interval_loss = torch.tensor(state.interval[0], dtype=torch.float32, device=self.device)
        self.good, self.steps, self.seconds = state.interval[1:]
        self.started, self.last_log = time.time() - state.elapsed_s, (time.time(), state.step)
        profile_step = state.step + 3 if os.environ.get("LLAMA_PROFILE") and rank == 0 else None
        self.stop = Stop()
        try:
            while state.step < t.train_iters and not self.stopping:
                state.step += 1
                step, start = state.step, time.perf_counter()
                lr = learning_rate(self.config.optimizer.learning_rate, step, t.train_iters)
                with profiled(step == profile_step):
                    grad_norm, problem = self.train_step(lr)
                self.steps, self.seconds = self.steps + 1, self.seconds + time.perf_counter() - start
                if problem:
                    state.skipped_in_a_row += 1
                    self.log(f"step {step} | skipped: {problem}", step=step, skipped=problem)
                    if state.skipped_in_a_row > t.max_skipped_steps:
                        raise NonFinite(f"stopped at step {step}: {state.skipped_in_a_row} steps in a row had a "
                                        f"non-finite loss or gradient (training.max_skipped_steps is "
                                        f"{t.max_skipped_steps}). Lower the learning rate or look at the data, "
                                        "then run again: it resumes from the newest checkpoint.")
                else:
                    state.skipped_in_a_row, self.good = 0, self.good + 1
                last = step == t.train_iters
                # Every logs.interval steps, and at steps 1, 2, 4, 8, ... before the first one: early signs.
                early = step < t.logs.interval and step & (step - 1) == 0
                if (step % t.logs.interval == 0 or last or early) and self.good:
                    self.log_interval(self.interval_loss / self.good, lr, grad_norm)
                self.on_intervals(last)
                if self.stopping and not last:
                    if not (t.checkpoint.interval is not None and step % t.checkpoint.interval == 0):
                        self.write_checkpoint()
                    self.log(f"stopped at step {step}; run the same command to resume")
        except BaseException as e:
            self.log.tracker.alert("run failed", f"at step {state.step}: {e!r}")
            raise
        finally:
            self.stop.restore()
            self.log.tracker.finish(f"{'stopped' if self.stopping else 'ended'} at step {state.step}")
            for loader in self.loaders.values():
                loader.close()

    def log_schedule_changes(self) -> None:
        """A resume whose schedule differs from the checkpoint's says what moved, and the learning rate."""
        saved = yaml.safe_load((self.checkpoint / "config.yaml").read_text())
        old = LearningRateConfig(**saved["optimizer"]["learning_rate"])
        old_iters, c, t = saved["training"]["train_iters"], self.config.optimizer.learning_rate, self.config.training
        moved = [f"training.train_iters {old_iters} -> {t.train_iters}"] if old_iters != t.train_iters else []
        moved += [f"optimizer.learning_rate.{k} {getattr(old, k)} -> {getattr(c, k)}"
                  for k in dataclasses.asdict(c) if getattr(old, k) != getattr(c, k)]
        step = self.state.step + 1
        if moved:
            self.log(f"the schedule changed since the checkpoint: {'; '.join(moved)}. The learning rate of step "
                     f"{step} is {learning_rate(c, step, t.train_iters):.4e} (it would have been "
                     f"{learning_rate(old, step, old_iters):.4e})")

    def train_step(self, lr: float) -> tuple[float, str | None]:
        """One optimizer step: every micro-batch's forward and backward, then, if the loss and the
        gradients are finite on every rank, the AdamW update. Returns the global gradient norm before
        clipping, and why the step was skipped (None if it was not)."""
        micro_batches = self.loaders["train"].next_batch()
        # The step's loss is the mean over its labelled tokens on all ranks, as Fast-LLM's (labels in a
        # loss-masking span don't count): each micro-batch's mean weighs in by its share of them, which is
        # 1 / (micro-batches x ranks) when no label is masked. A micro-batch with no label adds nothing.
        counts = [(labels != IGNORE_INDEX).sum() for _, labels in micro_batches]
        total = sum(counts)
        if self.world > 1:
            dist.all_reduce(total)
        self.optimizer.zero_grad()
        interval_loss = self.interval_loss.clone()  # becomes the interval's sum if the step is kept
        for (inputs, labels), count in zip(micro_batches, counts):
            # The loss-scaling contract: model() returns the mean loss over a micro-batch's labelled tokens,
            # kernels.py's fused cross-entropy makes that mean's gradient, scaled by what backward passes in,
            # and zero.py sums gradients over micro-batches and ranks. Weighting each micro-batch by its
            # share of the step's labels makes that sum the gradient of the step's mean loss.
            loss = torch.where(count > 0, self.model(inputs, labels) * count / total, 0.0)
            loss.backward()
            interval_loss += loss.detach() * self.world  # log_interval's all_reduce_mean divides by the ranks
        grad_norm = self.optimizer.reduce()
        # What every rank must agree on, in one all-reduce and one host synchronization a step: ranks
        # whose loss is not finite, ranks asked to stop; the gradient norm is already global.
        flags = torch.tensor([0.0, float(self.stop.requested is not None)], device=self.device)
        flags[0] = (~torch.isfinite(interval_loss)).float()
        if self.world > 1:
            dist.all_reduce(flags)
        bad_loss, stop, norm = torch.cat([flags, grad_norm.view(1).float()]).tolist()
        self.stopping = stop > 0  # agreed; stop.requested, the signal handler's own flag, stays as it is
        if bad_loss or not math.isfinite(norm):
            return norm, "non-finite loss" if bad_loss else f"non-finite gradient norm ({norm})"
        self.optimizer.update(lr, self.config.optimizer.gradient_norm_clipping, grad_norm)
        self.interval_loss = interval_loss
        return norm, None

    def log_interval(self, loss: torch.Tensor, lr: float, grad_norm: float) -> None:
        loss, step, world, t = all_reduce_mean(loss, self.world), self.state.step, self.world, self.config.training
        tokens_per_s, now = self.steps * self.tokens_per_step / self.seconds, time.time()
        eta = (t.train_iters - step) * (now - self.last_log[0]) / (step - self.last_log[1])
        elapsed, tokens = now - self.started, self.loaders["train"].consumed_samples * self.config.batch.sequence_length
        metrics = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                       tokens_per_s_per_gpu=tokens_per_s / world, tokens=tokens, elapsed_s=elapsed)
        text = (f"step {step}/{t.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
                f"{tokens_per_s:,.0f} tokens/s ({tokens_per_s / world:,.0f} per rank) | {tokens / 1e6:,.2f}M tokens | "
                f"{self.seconds / self.steps:.3f} s/step | elapsed {clock(elapsed)} | ETA {clock(eta)}")
        if self.device.type == "cuda":
            metrics.update(mfu=tokens_per_s / world * self.flops_per_token / H100_PEAK_FLOPS,
                           memory_gb=torch.cuda.max_memory_allocated() / 1e9)
            text += f" | MFU {metrics['mfu']:.1%} | peak memory {metrics['memory_gb']:.1f} GB"
        self.log(text, **metrics)
        alert = t.wandb.alert.interval
        if alert and step % alert == 0:
            self.log.tracker.alert(f"step {step}", f"loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s", status=True)
        self.interval_loss.zero_()
        self.good, self.steps, self.seconds, self.last_log = 0, 0, 0.0, (now, step)

    def on_intervals(self, last: bool) -> None:
        """Validation, test, export and checkpoint, each on its interval and at the end."""
        t, b, step = self.config.training, self.config.batch, self.state.step
        if t.validation.interval is not None and (step % t.validation.interval == 0 or last):
            loss = evaluate(self.model, self.loaders["validation"], t.validation.iterations, self.world, self.device)
            self.log(f"step {step} | validation loss {loss:.4f}", step=step, val_loss=loss)
        if last and t.test_iters:
            test = Loader(*self.sources["test"], 0, b.batch_size, b.micro_batch_size, self.rank, self.world,
                          self.device)
            loss = evaluate(self.model, test, t.test_iters, self.world, self.device)
            test.close()
            self.log(f"step {step} | test loss {loss:.4f}", step=step, test_loss=loss)
        if t.export.interval is not None and (step % t.export.interval == 0 or last):
            self.write_export()
        if t.checkpoint.interval is not None and (step % t.checkpoint.interval == 0 or last):
            self.write_checkpoint()

    def write_export(self) -> None:
        error, step, m = None, self.state.step, self.config.model.base_model
        context = export.context_length(m, self.config.batch.sequence_length)
        if self.rank == 0:
            try:  # overwrite: a run that crashed after an export but before its checkpoint writes it again.
                out = export.export_llama(cpu_state_dict(self.model), m, self.exp / "export" / "llama" / str(step),
                                          max_position_embeddings=context, tokenizer_path=self.data.tokenizer_path,
                                          overwrite=True)
                self.log(f"step {step} | exported to {out}")
            except OSError as e:
                error = e
        agree(error, f"the export of step {step}")

    def write_checkpoint(self) -> None:
        self.state.consumed = {s: loader.consumed_samples for s, loader in self.loaders.items()}
        self.state.interval = [self.interval_loss.item(), self.good, self.steps, self.seconds]
        self.state.elapsed_s = time.time() - self.started
        self.state.world_size, self.state.weights_finite = self.world, weights_finite(self.model)
        save_checkpoint(self.exp, self.model, self.optimizer, self.state, self.config, self.rank, self.world)
        self.log(f"step {self.state.step} | checkpoint written to {self.exp / 'checkpoints' / str(self.state.step)}")


# ---------------------------------------------------------------------------------------------
# Entry point


HELP = """sections of CONFIG.yaml (Fast-LLM's schema; every key, its default and the exit codes: docs/schema.md):
  training            train_iters; logs, validation, checkpoint and export intervals; test_iters; wandb
  batch               micro_batch_size, sequence_length, batch_size (global: micro x ranks x accumulation)
  data                format (file | random), path (dataset JSON), split of train/validation/test
  optimizer           AdamW: weight_decay, beta_1, beta_2, epsilon, gradient_norm_clipping, learning_rate
  model.base_model    the Llama: vocab_size, transformer.* (layers, sizes, heads, rotary), cross_entropy_impl
  model.multi_stage   zero_stage 1 or 2
  model.distributed   training_dtype (float32, bf16, float16), seed
  run                 experiment_dir: config, metrics.jsonl, checkpoints, exports; a run resumes from it
  pretrained          start from a Hugging Face Llama folder (format, path, model_weights)

examples:
  python train.py config/tiny.yaml training.train_iters=200
  torchrun --nproc_per_node=8 train.py config/llama3_8b.yaml data.path=data/mine/fast_llm_dataset.json
  python plot.py experiments/tiny     (the loss curves as a PNG)"""


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Pretrain a Llama-3.1 from one YAML file in Fast-LLM's schema.", epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", metavar="CONFIG.yaml", help="the training configuration")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override any key by its dotted path; the value is read as YAML (data.split=[98,1,1])")
    parser.add_argument("--dry-run", action="store_true", help="check the config (and a pretrained folder's "
                        "shapes), print the parameter count, the tokens per step and the accumulation steps, write "
                        "nothing")
    return parser.parse_intermixed_args(argv)


def dry_run(config: Config, rank: int, world: int) -> None:
    with torch.device("meta"):
        model = Llama(config.model.base_model, config.batch.sequence_length)
    if config.pretrained is not None and config.pretrained.model_weights:
        export.load_llama_weights(model, config.pretrained.path)  # names and shapes only, from the headers
    b, d, m = config.batch, config.data, config.model
    # The data too, where it is (a login node may not see it): its files, splits and tokens, reading the cache
    # of an earlier run but writing none.
    checked = d.format == "random" or Path(d.path).is_file()
    if checked:
        Data(d, b.sequence_length, m.base_model.vocab_size, m.distributed.seed,
             Path(config.run.experiment_dir) / "cache")
    if rank == 0:
        print(f"parameters: {count_parameters(model)}\ntokens per step: {b.batch_size * b.sequence_length}\n"
              f"accumulation steps: {b.batch_size // (b.micro_batch_size * world)}"
              + ("" if checked else f"\ndata: {d.path} not found here, not checked"))


def main(argv: list[str]) -> int:
    args = parse_arguments(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    try:
        config = load_config(args.config, args.overrides, world)
        if args.dry_run:
            dry_run(config, rank, world)
            return 0
        device = torch.device("cpu")
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            Trainer(config, rank, world, device).train()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except NonFinite as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 3
    except (ConfigError, DataError, export.ExportError, CheckpointError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the run had to write or read: a full disk, a permission, a vanished mount
        print(f"error (rank {rank}): {e.strerror or e} ({e.filename or 'no file name'}). The newest complete "
              "checkpoint is intact: fix the cause and run the same command to resume.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the loop, where SIGINT still interrupts at once
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
