"""Pretrain a Llama-3.1 from one YAML file in Fast-LLM's schema.

    python train.py config/tiny.yaml [section.key=value ...] [--dry-run]
    torchrun --nproc_per_node=8 train.py config/llama3_8b.yaml

One step, as the loop below reads: for each micro-batch of this rank's share of the global batch,
forward and backward (the optimizer reduce-scatters gradients as they appear); then the optimizer
clips by the global norm, updates its float32 shard and all-gathers the new weights; then log,
validate, checkpoint and export on their intervals. Everything the run writes lands in
`run.experiment_dir`; a run that finds a complete checkpoint there resumes from it exactly.
"""
import contextlib
import dataclasses
import difflib
import json
import math
import os
import shutil
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
from safetensors.torch import save_file

import export
from data import IGNORE_INDEX, Data, DataConfig, DataError, Loader
from model import BaseModelConfig, Llama, count_parameters
from zero import ZeroAdamW

# ---------------------------------------------------------------------------------------------
# The schema: one dataclass per YAML section (SCHEMA.md). `None` marks a required key or "off".


@dataclass
class LogsConfig:
    interval: int = 100  # steps between log lines


@dataclass
class ValidationConfig:
    interval: int | None = None  # steps between validation passes (and one at the end); None: off
    iterations: int | None = None  # global batches per validation pass


@dataclass
class CheckpointConfig:
    interval: int | None = None  # steps between checkpoints, and one at the end; None: off
    keep: int = 5  # newest complete checkpoints kept


@dataclass
class ExportConfig:
    format: str = "llama"  # Hugging Face LlamaForCausalLM folders
    interval: int | None = None  # steps between exports (and one at the end); None: off


@dataclass
class TrainingConfig:
    train_iters: int | None = None  # required: optimizer steps in the whole run
    logs: LogsConfig = field(default_factory=LogsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    test_iters: int = 0  # global batches of the test split evaluated once at the end
    export: ExportConfig = field(default_factory=ExportConfig)


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
    decay_power: float = 1.0  # exponent of the `power` style (Fast-LLM's key; 1 is linear)


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
    training_dtype: str = "float32"  # float32, bf16 (bfloat16), float16; masters stay float32
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


DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16}
H100_PEAK_FLOPS = 989e12  # dense bf16, the MFU denominator of PERF.md


class ConfigError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Reading the YAML: types and unknown keys are checked against the dataclasses, with full key paths


def build(cls, raw, path: str):
    """Build dataclass `cls` from the parsed YAML mapping `raw` at key path `path`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"`{path}` must be a mapping of keys, got {raw!r}")
    hints, names = typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean `{path}.{close[0]}`?" if close else f" Known keys: {', '.join(names)}."
            raise ConfigError(f"unknown key `{path}.{key}`.{hint}")
    return cls(**{key: convert(hints[key], value, f"{path}.{key}") for key, value in raw.items()})


def convert(kind, value, path: str):
    """Check `value` against the annotation `kind` (int, float, str, bool, list[float], X | None, a dataclass)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if value is None:
            return None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    if dataclasses.is_dataclass(kind):
        return build(kind, value, path)
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise ConfigError(f"`{path}` must be a list, got {value!r}")
        return [convert(typing.get_args(kind)[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if kind is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"`{path}` must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def load_config(path: str, overrides: list[str]) -> Config:
    """Parse the YAML file, apply `section.key=value` overrides, merge a pretrained config.json under
    the file's own model.base_model keys, and build the dataclasses."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}")
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
        node[leaf] = yaml.safe_load(value)
    pretrained = raw.get("pretrained")
    if isinstance(pretrained, dict) and pretrained.get("path"):
        base = export.base_model_dict_from_hf(pretrained["path"])
        own = ((raw.get("model") or {}).get("base_model")) or {}
        raw.setdefault("model", {})
        raw["model"] = dict(raw["model"] or {}, base_model=merge(base, own))
    return build(Config, raw, "config")


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def validate(c: Config, world_size: int) -> None:
    """Values the types alone don't rule out; every problem found is reported at once."""
    t, m = c.training, c.model.base_model
    checks = [
        (t.train_iters is None or t.train_iters < 1, f"training.train_iters is required and must be at least 1, got {t.train_iters}"),
        (t.logs.interval < 1, "training.logs.interval must be at least 1"),
        (t.validation.interval is not None and t.validation.interval < 1, "training.validation.interval must be at least 1 (or null: off)"),
        (t.validation.interval is not None and (t.validation.iterations or 0) < 1, "training.validation.iterations must be at least 1 when validation.interval is set"),
        (t.checkpoint.interval is not None and t.checkpoint.interval < 1, "training.checkpoint.interval must be at least 1 (or null: off)"),
        (t.checkpoint.keep < 1, "training.checkpoint.keep must be at least 1"),
        (t.test_iters < 0, "training.test_iters must not be negative"),
        (t.export.format != "llama", f"training.export.format `{t.export.format}` is not supported; use `llama`"),
        (t.export.interval is not None and t.export.interval < 1, "training.export.interval must be at least 1 (or null: off)"),
        (c.batch.micro_batch_size < 1, "batch.micro_batch_size must be at least 1"),
        (c.batch.sequence_length < 1, "batch.sequence_length must be at least 1"),
        (c.batch.batch_size is None, "batch.batch_size is required"),
        *((True, message) for message in c.data.errors()),
        (c.optimizer.learning_rate.base < 0 or c.optimizer.learning_rate.minimum < 0, "optimizer.learning_rate.base and .minimum must not be negative"),
        (c.optimizer.learning_rate.decay_style not in SCHEDULES, f"optimizer.learning_rate.decay_style `{c.optimizer.learning_rate.decay_style}` must be one of {', '.join(SCHEDULES)}"),
        (c.optimizer.learning_rate.warmup_iterations < 0, "optimizer.learning_rate.warmup_iterations must not be negative"),
        (c.optimizer.learning_rate.decay_power <= 0, "optimizer.learning_rate.decay_power must be positive"),
        (not (0 <= c.optimizer.beta_1 < 1 and 0 <= c.optimizer.beta_2 < 1), "optimizer.beta_1 and beta_2 must lie in [0, 1)"),
        (c.optimizer.epsilon <= 0, "optimizer.epsilon must be positive"),
        (c.optimizer.weight_decay < 0, "optimizer.weight_decay must not be negative"),
        (c.optimizer.gradient_norm_clipping < 0, "optimizer.gradient_norm_clipping must not be negative (0: off)"),
        *((True, message) for message in m.errors()),
        (c.model.multi_stage.zero_stage not in (1, 2), "model.multi_stage.zero_stage must be 1 or 2"),
        (c.model.distributed.training_dtype not in DTYPES, f"model.distributed.training_dtype `{c.model.distributed.training_dtype}` must be one of {', '.join(DTYPES)}"),
        (c.run.experiment_dir is None, "run.experiment_dir is required"),
        (c.pretrained is not None and (c.pretrained.format != "llama" or not c.pretrained.path), "pretrained.format must be `llama` and pretrained.path is required"),
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
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


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
    progress = min(1.0, (step - c.warmup_iterations) / max(1, end - c.warmup_iterations))
    if c.decay_style == "cosine":
        return c.minimum + 0.5 * (c.base - c.minimum) * (1 + math.cos(math.pi * progress))
    power = 1.0 if c.decay_style == "linear" else c.decay_power
    return c.base + (c.minimum - c.base) * progress**power


# ---------------------------------------------------------------------------------------------
# Checkpoints: checkpoints/STEP/ holds the model weights (rank 0), each rank's optimizer shard and
# random state, and the trainer state. It is written as checkpoints/.tmp-STEP and renamed when every
# rank has finished, so a run killed mid-write leaves nothing that looks complete.

EXECUTION_ONLY = ("cross_entropy_impl", "recompute_layers")  # model keys a resumed run may change


def find_checkpoint(experiment_dir: Path) -> Path | None:
    root = experiment_dir / "checkpoints"
    steps = [int(p.name) for p in root.glob("*") if p.name.isdigit() and (p / "trainer.json").exists()]
    return root / str(max(steps)) if steps else None


def check_checkpoint(checkpoint: Path, config: Config) -> dict:
    """The checkpoint's trainer state, after checking that it was written by this model."""
    saved = json.loads((checkpoint / "model_config.json").read_text())
    ours = dataclasses.asdict(config.model.base_model)
    for key in EXECUTION_ONLY:
        saved.pop(key, None), ours.pop(key, None)
    if saved != ours:
        diff = [f"{k}: {saved.get(k)!r} there, {ours.get(k)!r} here" for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
        raise ConfigError(
            f"{checkpoint} was written by a different model than model.base_model describes "
            f"({'; '.join(diff)}). Use another run.experiment_dir, or the model that wrote it."
        )
    trainer = json.loads((checkpoint / "trainer.json").read_text())
    if trainer["sequence_length"] != config.batch.sequence_length:
        raise ConfigError(f"{checkpoint} was trained with batch.sequence_length {trainer['sequence_length']}, not {config.batch.sequence_length}")
    return trainer


def save_checkpoint(exp: Path, step: int, model, optimizer, trainer: dict, config: Config, rank: int, world: int):
    root = exp / "checkpoints"
    tmp, final = root / f".tmp-{step}", root / str(step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    tensors = optimizer.sharded_state()
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, tmp / f"optimizer-{rank:05d}-of-{world:05d}.safetensors")
    if rank == 0:
        save_file(cpu_state_dict(model), tmp / "model.safetensors")
        (tmp / "model_config.json").write_text(json.dumps(dataclasses.asdict(config.model.base_model), indent=2))
        (tmp / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
        (tmp / "trainer.json").write_text(json.dumps(dict(trainer, step=step, world_size=world), indent=2))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        done = sorted(int(p.name) for p in root.glob("*") if p.name.isdigit())
        for old in done[: -config.training.checkpoint.keep]:
            shutil.rmtree(root / str(old))
    barrier()


def load_checkpoint(checkpoint: Path, optimizer, trainer: dict, rank: int, world: int) -> None:
    files = sorted(checkpoint.glob("optimizer-*-of-*.safetensors"))
    if len(files) != trainer["world_size"]:
        raise ConfigError(f"{checkpoint} should hold {trainer['world_size']} optimizer shards, found {len(files)}")
    shards = [safe_open(f, framework="pt", device="cpu") for f in files]
    try:
        optimizer.load_sharded_state(shards)
    except ValueError as e:  # a damaged or foreign optimizer shard
        raise ConfigError(f"{checkpoint}: {e}") from None
    if world == trainer["world_size"]:  # the same ranks continue with their own random streams
        own = shards[rank]
        torch.set_rng_state(own.get_tensor("rng/cpu"))
        if torch.cuda.is_available() and "rng/cuda" in own.keys():
            torch.cuda.set_rng_state(own.get_tensor("rng/cuda"))


def cpu_state_dict(model) -> dict[str, torch.Tensor]:
    # Copies: the parameters are views into the optimizer's flat buffers, which safetensors refuses.
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def recompute_layers(config: Config, device: torch.device) -> int:
    """The configured number of recomputed blocks, or (null) the fewest that let the others keep their
    activations in the GPU memory left once weights and optimizer are in place. Per token a block keeps
    7 x hidden (input, 2 norm outputs, q, attention output, o_proj's input, residual), k and v, and
    4 x ffn (gate, up, activation, product); a recomputed one keeps its input. The reserve covers one
    block being recomputed, the loss chunks, the reduce-scatter staging and allocator slack."""
    m, b = config.model.base_model, config.batch
    if m.recompute_layers is not None or device.type != "cuda":
        return m.recompute_layers or 0
    t, tokens = m.transformer, b.micro_batch_size * b.sequence_length
    size = tokens * DTYPES[config.model.distributed.training_dtype].itemsize
    per_block = size * (7 * t.hidden_size + 2 * t.head_groups * t.head_dim + 4 * t.ffn_size)
    free, total = torch.cuda.mem_get_info(device)
    budget = free - per_block - 8e9 - 0.05 * total - t.num_layers * size * t.hidden_size
    return max(0, t.num_layers - max(0, int(budget // (per_block - size * t.hidden_size))))


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
    """Rank 0 prints and appends JSON lines to metrics.jsonl; other ranks stay quiet."""

    def __init__(self, path: Path, rank: int, keep_until: int | None):
        self.path, self.rank = path, rank
        if rank == 0 and keep_until is not None and path.exists():
            # Resuming: drop what the interrupted run logged after its checkpoint, so the file reads as one run.
            kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= keep_until]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(l + "\n" for l in kept))
            tmp.replace(path)

    def __call__(self, text: str, **metrics):
        if self.rank == 0:
            print(text, flush=True)
        if self.rank == 0 and metrics:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")


@contextlib.contextmanager
def profiled(active: bool):
    """LLAMA_PROFILE=FILE: rank 0 profiles its third step and writes the operations by device time."""
    if not active:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as profile:
        yield
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    Path(os.environ["LLAMA_PROFILE"]).write_text(profile.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=90))


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


def train(config: Config, rank: int, world: int, device: torch.device) -> None:
    t, b = config.training, config.batch
    exp = Path(config.run.experiment_dir)
    checkpoint = find_checkpoint(exp)
    trainer = check_checkpoint(checkpoint, config) if checkpoint else {"step": 0, "consumed": {"train": 0, "validation": 0}}

    # Model: built on meta, materialized and initialized on the device, the same on every rank.
    torch.manual_seed(config.model.distributed.seed)
    with torch.device("meta"):
        model = Llama(config.model.base_model, b.sequence_length, DTYPES[config.model.distributed.training_dtype])
    model.init_weights(device)
    if config.pretrained is not None and config.pretrained.model_weights and checkpoint is None:
        export.load_llama_weights(model, config.pretrained.path)

    data = Data(config.data, b.sequence_length, config.model.base_model.vocab_size, config.model.distributed.seed, exp / "cache")
    if t.validation.interval is not None and data.num_samples("validation") == 0:
        raise DataError(f"training.validation is on but the validation split of data.split {config.data.split} holds no sample")
    if t.test_iters and data.num_samples("test") == 0:
        raise DataError(f"training.test_iters is {t.test_iters} but the test split of data.split {config.data.split} holds no sample")

    c = config.optimizer
    optimizer = ZeroAdamW(model, lr=c.learning_rate.base, betas=(c.beta_1, c.beta_2), eps=c.epsilon,
                          weight_decay=c.weight_decay, zero_stage=config.model.multi_stage.zero_stage)
    if checkpoint:
        load_checkpoint(checkpoint, optimizer, trainer, rank, world)
    model.recompute_layers = recompute_layers(config, device)

    # Nothing was written until here: every check above can fail without touching earlier work.
    if rank == 0:
        exp.mkdir(parents=True, exist_ok=True)
        (exp / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    log = Logger(exp / "metrics.jsonl", rank, trainer["step"] if checkpoint else 0)
    for warning in data.warnings:
        log(f"warning: {warning}")
    step, consumed = trainer["step"], trainer["consumed"]
    loaders = {s: Loader(data, s, consumed.get(s, 0), b.batch_size, b.micro_batch_size, rank, world, device)
               for s in ("train", "validation")}
    # PERF.md: 6 N + 12 L H Q T, N without the input embedding (a tied one counts as the head).
    n_params, tr = count_parameters(model), config.model.base_model.transformer
    embedding = 0 if config.model.base_model.tie_word_embeddings else model.embed_tokens.weight.numel()
    flops_per_token = 6 * (n_params - embedding) + 12 * tr.num_layers * tr.num_attention_heads * tr.head_dim * b.sequence_length
    tokens_per_step = b.batch_size * b.sequence_length
    log(f"{'resuming from ' + str(checkpoint) if checkpoint else 'starting'}: {n_params:,} parameters, "
        f"{world} rank(s), {tokens_per_step:,} tokens per step, {b.batch_size // (b.micro_batch_size * world)} accumulation steps, "
        f"{model.recompute_layers} of {tr.num_layers} blocks recomputed in backward")
    if step >= t.train_iters:
        log(f"training already complete at step {step}")
        return

    def write_checkpoint():
        consumed = {s: loader.consumed_samples for s, loader in loaders.items()}
        save_checkpoint(exp, step, model, optimizer, {"consumed": consumed, "sequence_length": b.sequence_length}, config, rank, world)
        log(f"step {step} | checkpoint written to {exp / 'checkpoints' / str(step)}")

    def write_export():
        if rank == 0:
            # overwrite: a run that crashed after an export but before its checkpoint writes it again.
            out = export.export_llama(cpu_state_dict(model), config.model.base_model, exp / "export" / "llama" / str(step),
                                      max_position_embeddings=export.context_length(config.model.base_model, b.sequence_length), tokenizer_path=data.tokenizer_path, overwrite=True)
            log(f"step {step} | exported to {out}")
        barrier()

    # tokens/s counts training steps only; grad_norm's .item() in optimizer.step synchronizes the device.
    interval_loss, interval_steps, interval_time = torch.zeros((), device=device), 0, 0.0
    profile_step = step + 3 if os.environ.get("LLAMA_PROFILE") and rank == 0 else None
    while step < t.train_iters:
        step += 1
        start = time.perf_counter()
        lr = learning_rate(c.learning_rate, step, t.train_iters)
        with profiled(step == profile_step):
            micro_batches = loaders["train"].next_batch()
            # The step's loss is the mean over its labelled tokens on all ranks, as Fast-LLM's: each micro-batch's
            # mean weighs in by its share of them (1 / (micro-batches x ranks) when no label is masked), and the
            # optimizer sums the gradients. A micro-batch with no label (mean 0 / 0) adds nothing.
            counts = [(labels != IGNORE_INDEX).sum() for _, labels in micro_batches]
            total = sum(counts)
            if world > 1:
                dist.all_reduce(total)
            optimizer.zero_grad()
            for (inputs, labels), count in zip(micro_batches, counts):
                loss = torch.where(count > 0, model(inputs, labels) * count / total, 0.0)
                loss.backward()
                interval_loss += loss.detach() * world  # all_reduce_mean divides the sum over ranks by world
            grad_norm = optimizer.step(lr, c.gradient_norm_clipping)
        interval_steps, interval_time = interval_steps + 1, interval_time + time.perf_counter() - start

        if step % t.logs.interval == 0 or step == t.train_iters:
            loss = all_reduce_mean(interval_loss / interval_steps, world)
            tokens_per_s = interval_steps * tokens_per_step / interval_time
            metrics = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s, tokens_per_s_per_gpu=tokens_per_s / world)
            text = f"step {step}/{t.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | {tokens_per_s:,.0f} tokens/s ({tokens_per_s / world:,.0f} per rank)"
            if device.type == "cuda":
                metrics.update(mfu=tokens_per_s / world * flops_per_token / H100_PEAK_FLOPS, memory_gb=torch.cuda.max_memory_allocated() / 1e9)
                text += f" | MFU {metrics['mfu']:.1%} | peak memory {metrics['memory_gb']:.1f} GB"
            log(text, **metrics)
            interval_loss.zero_()
            interval_steps, interval_time = 0, 0.0

        last = step == t.train_iters
        if t.validation.interval is not None and (step % t.validation.interval == 0 or last):
            loss = evaluate(model, loaders["validation"], t.validation.iterations, world, device)
            log(f"step {step} | validation loss {loss:.4f}", step=step, val_loss=loss)
        if last and t.test_iters:
            test = Loader(data, "test", 0, b.batch_size, b.micro_batch_size, rank, world, device)
            loss = evaluate(model, test, t.test_iters, world, device)
            test.close()
            log(f"step {step} | test loss {loss:.4f}", step=step, test_loss=loss)
        if t.export.interval is not None and (step % t.export.interval == 0 or last):
            write_export()
        if t.checkpoint.interval is not None and (step % t.checkpoint.interval == 0 or last):
            write_checkpoint()
    for loader in loaders.values():
        loader.close()


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--dry-run"]
    if not args or args[0].startswith("-"):
        print("usage: python train.py CONFIG.yaml [section.key=value ...] [--dry-run]", file=sys.stderr)
        return 2
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    try:
        config = load_config(args[0], args[1:])
        validate(config, world)
        if "--dry-run" in argv:
            with torch.device("meta"):
                model = Llama(config.model.base_model, config.batch.sequence_length)
            b = config.batch
            if rank == 0:
                print(f"parameters: {count_parameters(model)}\ntokens per step: {b.batch_size * b.sequence_length}\n"
                      f"accumulation steps: {b.batch_size // (b.micro_batch_size * world)}")
            return 0
        device = torch.device("cpu")
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            train(config, rank, world, device)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except (ConfigError, DataError, export.ExportError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
