"""The training configuration: Fast-LLM's YAML schema as one dataclass per section (docs/schema.md), read with every
problem reported at once, validated, merged with a `pretrained` config.json; Fast-LLM v0.4's keys rewritten as ours."""
import contextlib
import difflib
import importlib.util
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path

import torch
import yaml

import export
from checkpoint import checkpoint_steps
from data import DataConfig, yaml_problem
from model import BaseModelConfig

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
    cross_document_attention: bool = True  # false: a token attends only within its own document of a sequence


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
    seed: int = 1234  # Fast-LLM's key: the weight init (the data has data.sampling.seed)


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

TRAINING_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # Fast-LLM's names and short names
SCHEDULES = ("constant", "linear", "cosine", "power")


class ConfigError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Reading the YAML: types and unknown keys are checked against the dataclasses, with full key paths


def build(cls, raw, path: str, errors: list[tuple[str, str]]):
    """Build dataclass `cls` from the parsed YAML mapping `raw` at key path `path`. Every unknown key and wrong
    type goes in `errors` as (the wrong value's key path or None, message), its field keeping its default."""
    if raw is not None and not isinstance(raw, dict):  # null: an empty section
        errors.append((path, f"`{path}` must be a mapping of keys, got {raw!r}"))
    hints, names, values = typing.get_type_hints(cls), [f.name for f in fields(cls)], {}
    for key, value in (raw if isinstance(raw, dict) else {}).items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            hint = did_you_mean(str(key), names, path) or f" Known keys: {', '.join(names)}."
            errors.append((None, f"unknown key `{where}`.{hint}"))
            continue
        try:
            values[key] = convert(hints[key], value, where, errors)
        except ConfigError as e:
            errors.append((where, str(e)))
    return cls(**values)


def convert(kind, value, path: str, errors: list[tuple[str, str]]):
    """Check `value` against the annotation `kind` (int, float, str, bool, list[float], X | None, a dataclass)."""
    if type(None) in typing.get_args(kind):  # X | None
        if value is None:
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if is_dataclass(kind):
        return build(kind, value, path, errors)
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise ConfigError(f"`{path}` must be a list, got {value!r}")
        return [convert(typing.get_args(kind)[0], v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):  # YAML 1.1 reads 1e-4 as text
        with contextlib.suppress(ValueError):
            value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"`{path}` must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"`{path}` must be a finite number, got {value}")
    if kind is int and not -2**63 <= value < 2**63:
        raise ConfigError(f"`{path}` must fit in 64 bits, got {value}")
    return value


def did_you_mean(key: str, known: list[str], parent: str) -> str:
    """The hint after an unknown key: the known key it is a near miss of, if one is."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.7)
    return f" Did you mean `{parent + '.' if parent else ''}{close[0]}`?" if close else ""


def load_config(path: str, overrides: list[str], world_size: int = 1) -> Config:
    """Parse the YAML file, apply `section.key=value` overrides, merge a pretrained config.json under the file's own
    model.base_model keys, build and validate the Config for `world_size` ranks; one ConfigError lists all problems."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError) as e:
        why = {FileNotFoundError: "does not exist", IsADirectoryError: "is a folder"}.get(type(e), "is not UTF-8")
        raise ConfigError(f"config file {path} {why}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML{yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (training, batch, data, ...)")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"command-line override `{item}` must look like section.key=value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            if not isinstance(node := node.setdefault(part, {}), dict):
                raise ConfigError(f"override `{item}`: `{part}` is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"the value of command-line override `{item}` is not valid YAML"
                              f"{yaml_problem(e)}") from None
    errors, warnings, typed = [], [], []
    raw, named = translate(raw, world_size, errors, warnings)  # newer keys become ours; errors name the user's
    if isinstance(pretrained := raw.get("pretrained"), dict) and (folder := pretrained.get("path")):
        base, notes, model = pretrained_architecture(folder, raw.get("run")), [], raw.get("model") or {}
        raw["model"] = dict(model, base_model=merge(base, model.get("base_model") or {}, "model.base_model", notes))
        if os.environ.get("RANK", "0") == "0":
            for key, mine, theirs in notes:
                print(f"{named.get(key, key)}: {mine!r} from {path} overrides {theirs!r} from {folder}/config.json")
    config = build(Config, raw, "", typed)
    # A key of the wrong type kept its default: validate()'s messages on it (they start with the key) are left out.
    wrong = tuple(f"{key} " for key, _ in typed if key is not None)
    mine = [text for _, text in typed] + [e for e in validate(config, world_size) if not e.startswith(wrong)]
    errors += [re.sub(r"[\w.]*\w", lambda key: named.get(key[0], key[0]), e) for e in mine]  # the user's key paths
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
            value = merge(base[key], value, f"{path}.{key}", notes)
        elif key in base and base[key] != value:
            notes.append((f"{path}.{key}", value, base[key]))
        out[key] = value
    return out


def validate(c: Config, world_size: int) -> list[str]:
    """What is wrong with values that the types alone don't rule out."""
    t, o, lr, b = c.training, c.optimizer, c.optimizer.learning_rate, c.batch
    d, m = c.model.distributed, c.model.base_model.transformer
    checks = [
        ((t.train_iters or 0) < 1, f"training.train_iters is required and must be at least 1, got {t.train_iters}"),
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
        (b.micro_batch_size < 1, "batch.micro_batch_size must be at least 1"),
        (b.sequence_length < 1, "batch.sequence_length must be at least 1"),
        ((b.batch_size or 0) < 1, f"batch.batch_size is required and must be at least 1, got {b.batch_size}"),
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
        (d.training_dtype not in TRAINING_DTYPES,
         f"model.distributed.training_dtype `{d.training_dtype}` must be one of {', '.join(TRAINING_DTYPES)}"),
        (d.float8_matmuls and any(n % 16 for n in (m.hidden_size, m.ffn_size, m.head_groups * m.head_dim,
                                                   b.micro_batch_size * b.sequence_length)),
         "model.distributed.float8_matmuls needs multiples of 16 (torch._scaled_mm's): transformer.hidden_size, "
         "ffn_hidden_size, head_groups x the head dimension, and batch.micro_batch_size x sequence_length"),
        (c.run.experiment_dir is None, "run.experiment_dir is required"),
        (c.pretrained is not None and (c.pretrained.format != "llama" or not c.pretrained.path),
         "pretrained.format must be `llama` and pretrained.path is required"),
    ]
    errors = [message for failed, message in checks if failed]
    if (b.batch_size or 0) > 0 and b.micro_batch_size > 0 and b.batch_size % (unit := b.micro_batch_size * world_size):
        fits = sorted({max(unit, b.batch_size // unit * unit), (b.batch_size // unit + 1) * unit})
        micro = [n for n in range(1, b.batch_size + 1) if b.batch_size % (n * world_size) == 0]
        errors.append(f"batch.batch_size {b.batch_size} is not a whole number of micro-batches: micro_batch_size "
                      f"{b.micro_batch_size} x {world_size} rank(s) = {unit} sequences per accumulation step. "
                      f"batch_size values that fit: {' or '.join(map(str, fits))}; micro_batch_size values that "
                      f"fit: {', '.join(map(str, micro)) or 'none at this number of ranks'}")
    return errors


def pretrained_architecture(path: str, run) -> dict:
    """The model.base_model keys of the `pretrained` folder's config.json; taken instead from the run's
    own newest checkpoint when it has one, so that a resume never needs that folder again."""
    exp = run.get("experiment_dir") if isinstance(run, dict) else None
    for step in checkpoint_steps(Path(exp)) if exp else []:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((Path(exp) / "checkpoints" / str(step) / "model_config.json").read_text())
    return export.base_model_dict_from_hf(path)


# ---------------------------------------------------------------------------------------------
# Fast-LLM's newer schema (v0.4) has the architecture as embeddings / decoder.block.{mixer, mlp} / head, micro-batches
# in tokens, datasets and evaluators by name; `translate` rewrites it into ours (docs/schema.md, "Schema generations").

B, T, D = "model.base_model.", "model.base_model.transformer.", "model.distributed."
MIXER, MLP, NORM = B + "decoder.block.mixer.", B + "decoder.block.mlp.", "normalization."
RENAMES = {  # a newer key -> ours; two newer keys of one of ours must agree
    D + "compute_dtype": D + "training_dtype", B + "tied_embedding_weight": B + "tie_word_embeddings",
    B + "hidden_size": T + "hidden_size", B + "embeddings.position_embeddings.enabled": B + "use_position_embeddings",
    B + "embeddings.vocab_size": B + "vocab_size", B + "decoder.num_blocks": T + "num_layers",
    MIXER + "heads": T + "num_attention_heads", MIXER + "head_groups": T + "head_groups",
    MIXER + "head_size": T + "kv_channels", MIXER + "add_linear_biases": T + "add_linear_biases",
    MLP + "add_linear_biases": T + "add_linear_biases", MLP + "intermediate_size": T + "ffn_hidden_size",
    MLP + "gated": T + "gated", MLP + "activation": T + "activation_type",
    **{f"{B}{part}.{NORM}{key}": T + NORM + key for part in ("decoder.block", "head") for key in ("type", "epsilon")},
    **{f"{MIXER}rotary.{key}": f"{T}rotary.{key}"
       for key in ("scale_factor", "low_frequency_factor", "high_frequency_factor", "original_context_length")},
    MIXER + "cross_document_attention": "batch.cross_document_attention", "data.seed": "data.sampling.seed",
    "data.shuffle": "data.sampling.shuffle",
}
CHANGES = {  # newer keys (T: Fast-LLM 2025's) written otherwise here: ours, the change, why it may not apply
    f"{where}rotary.{key}": change for where in (MIXER, T) for key, change in [
        ("type", (T + "rotary.scaling_type", {"default": "none", "llama3": "llama3"}.__getitem__,
                  "Llama's rotary embeddings are default, or llama3 with Llama 3.1's scaling")),
        ("theta", (T + "rotary_embedding_scale", lambda theta: -math.log(theta), "must be positive"))]}
CHANGES[T + "cross_document_attention"] = ("batch.cross_document_attention", bool, "")  # early 2025's place
# What Fast-LLM's newer schema always does, and has no key for: documents of a sequence apart, their first tokens
# and the loss-masking spans not predicted.
NEWER_SEMANTICS = {"batch.cross_document_attention": False, "data.sampling.use_loss_masking_spans": True,
                   "data.sampling.ignore_document_starts": True}
PHASES = {"Training": "training", "Validation": "validation", "Test": "test"}  # datasets' names before 2025-03
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
    ((MIXER + "type", MLP + "type"), ("attention", "mlp"), "a block is attention and a dense MLP here"),
    ((D + "optimization_dtype",), ("float32", "fp32"), "master weights and optimizer state are float32 here"),
    (("data.truncate_documents",), (True,), "documents are cut at sequence boundaries; padding is not implemented"),
    ((MIXER + "use_flash_attention", MIXER + "implementation", T + "use_flash_attention", D + "timeout",
      "training.timeout", "training.num_workers", "data.gpu", "data.sampling.gpu", "schedule.micro_batch_splits"),
     None, ""),
] for path in paths}
BATCH = ("data.micro_batch_size", "data.maximum_document_length", "schedule.depth_first_micro_batches",
         "schedule.breadth_first_micro_batches")
SECTIONS = (B + "embeddings", B + "decoder", B + "head", "schedule")  # the newer schema's, absent from ours


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
        for i, part in enumerate(parents):
            if node.get(part) is None:  # absent, or null: an empty section
                node[part] = {}
            if not isinstance(node := node[part], dict):
                raise ConfigError(f"`{'.'.join(parents[: i + 1])}` must be a mapping of keys, got {node!r}")
        node[leaf] = value
    return tree


def translate(raw: dict, world_size: int, errors: list[str], warnings: list[str]) -> tuple[dict, dict[str, str]]:
    """The file with its keys of Fast-LLM's newer schema rewritten as ours (ours stay as they are), and {our key
    path: the path the user wrote}, so that later messages name the user's keys."""
    flat, named = flatten(raw), {}
    newer = any(p.startswith((*BATCH, *RENAMES, *SECTIONS, "data.datasets", "training.evaluators")) for p in flat)

    def put(path: str, value, source: str):
        if path in flat and flat[path] != value:
            errors.append(f"`{source}` and `{named.get(path, path)}` both set `{path}`, to {value!r} and "
                          f"{flat[path]!r}; give them one value")
        flat[path], named[path] = value, named.get(path, source)

    def take(path: str, default=None):  # remove the value or the mapping at `path` and return it
        sub = {p[len(path) + 1:]: flat.pop(p) for p in list(flat) if p.startswith(path + ".")}
        return flat.pop(path, unflatten(sub) if sub else default)

    if newer and not flat.get("pretrained.path") and not any(p.startswith(T) for p in flat):  # its defaults, not ours
        flat.update({p: v for p, v in NEWER_DEFAULTS.items() if p not in flat and RENAMES[p] not in flat})
    errors += [f"`{a}` and `{b}`: this model has one setting for both; set both, or neither"
               for a, b in PAIRS if (a in flat) != (b in flat)]
    for path, value in list(flat.items()):
        if path in RENAMES or path in CHANGES:
            (target, change, why), _ = CHANGES.get(path, (RENAMES.get(path), None, "")), flat.pop(path)
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

    early = any(p.startswith(tuple(f"data.datasets.{name}" for name in PHASES)) for p in flat)  # early 2025: not v0.4
    flat.update({p: v for p, v in NEWER_SEMANTICS.items() if newer and not early and p not in flat})

    # The batch: on each rank, depth_first x breadth_first micro-batches of micro_batch_size tokens a step. Here:
    # sequences of maximum_document_length tokens (or micro_batch_size), so attention spans no more than there.
    if (sizes := [take(k) for k in BATCH]) != [None] * 4 or (newer and "batch" not in raw):
        tokens, longest, depth, breadth = (d if v is None else v for v, d in zip(sizes, (2048, None, 1, 1)))
        length = min(tokens, longest or tokens) if all(type(v) is int and v > 0 for v in sizes if v is not None) else 0
        if not length or tokens % length:
            errors.append(f"{', '.join(f'`{k}: {v}`' for k, v in zip(BATCH, sizes) if v is not None)}: these must be "
                          "positive integers, maximum_document_length a divisor of micro_batch_size if smaller")
            put("batch.batch_size", world_size, BATCH[0])  # a stand-in, so that it isn't also reported missing
        else:
            put("batch.sequence_length", length, BATCH[1] if length < tokens else BATCH[0])
            put("batch.micro_batch_size", tokens // length, BATCH[0])
            put("batch.batch_size", tokens // length * depth * breadth * world_size, BATCH[0])

    # One loss evaluator becomes training.validation, its dataset training.validation.path; the training dataset
    # becomes data.path (or data.format: random), read whole.
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
        kind, offset, dataset = spec.pop("type", "loss"), spec.pop("offset", 0), spec.pop("dataset_name", name)
        interval, iterations = spec.pop("interval", None), spec.pop("iterations", None)
        errors += [f"unknown key `{where}.{key}`" for key in spec]
        if kind != "loss" or offset != 0:
            errors.append(f"`{where}`: type {kind}, offset {offset}: only the validation loss (type loss) at "
                          "multiples of the interval (offset 0) is implemented")
        if interval is not None and iterations is not None:  # either one null turns it off
            validation = dataset
            put("training.validation.interval", interval, where + ".interval")
            put("training.validation.iterations", iterations, where + (".evaluator" if nested else "") + ".iterations")
    if not isinstance(datasets := take("data.datasets", {}), dict):
        errors.append(f"`data.datasets` must be a mapping of datasets by name, got {datasets!r}")
        datasets = {}
    warnings += [f"`data.datasets.{old}`: Fast-LLM's name before 2025-03, read as `{PHASES[old]}`" for old in datasets
                 if old in PHASES]
    datasets = {PHASES.get(name, name): spec for name, spec in datasets.items()}
    if validation is None and "validation" in datasets and "training.validation.interval" in flat:
        validation = "validation"  # training.validation, as then, reads it
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

    length = flat.get("batch.sequence_length", BatchConfig.sequence_length)
    for path in (MIXER + "window_size", T + "window_size"):  # a window as long as the sequences changes nothing
        if (window := take(path)) is not None and (type(window) is not int or window < length):
            errors.append(f"`{path}: {window!r}`: sliding-window attention is not implemented; a window of at least "
                          f"batch.sequence_length ({length}) tokens is full attention")
        elif window is not None:
            warnings.append(f"`{path}: {window}` is at least batch.sequence_length ({length}): changes nothing here")
    for path in [p for p in flat if p.startswith(SECTIONS)]:
        if flat.pop(path) not in (None, {}):  # what is left in a newer section, but an empty mapping, is unknown
            parent, _, key = path.rpartition(".")
            known = [k.rpartition(".")[2] for k in (*RENAMES, *NO_EFFECT) if k.startswith(parent + ".")]
            errors.append(f"unknown key `{path}`.{did_you_mean(key, known, parent)}")
    return unflatten(flat), {ours: theirs for ours, theirs in named.items() if ours != theirs}
