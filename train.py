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
from data import Data, DataConfig, DataError, Loader
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
H100_PEAK_FLOPS = 989e12  # dense bf16, the MFU denominator of docs/performance.md


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
    t, lr, o = c.training, c.optimizer.learning_rate, c.optimizer
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
        (c.model.multi_stage.zero_stage not in (1, 2), "model.multi_stage.zero_stage must be 1 or 2"),
        (c.model.distributed.training_dtype not in DTYPES,
         f"model.distributed.training_dtype `{c.model.distributed.training_dtype}` must be one of {', '.join(DTYPES)}"),
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


@dataclass
class TrainerState:
    """Where a run stands, besides its tensors: saved as a checkpoint's trainer.json."""
    step: int = 0  # optimizer steps taken
    consumed: dict[str, int] = field(default_factory=lambda: {"train": 0, "validation": 0})  # samples read
    sequence_length: int = 0  # tokens per sample: the samples, so the data order, depend on it
    world_size: int = 1  # ranks that wrote the optimizer shards


def find_checkpoint(experiment_dir: Path) -> Path | None:
    root = experiment_dir / "checkpoints"
    steps = [int(p.name) for p in root.glob("*") if p.name.isdigit() and (p / "trainer.json").exists()]
    return root / str(max(steps)) if steps else None


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


def save_checkpoint(exp: Path, model, optimizer, state: TrainerState, config: Config, rank: int, world: int):
    root = exp / "checkpoints"
    tmp, final = root / f".tmp-{state.step}", root / str(state.step)
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
        (tmp / "trainer.json").write_text(json.dumps(dataclasses.asdict(state), indent=2))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        done = sorted(int(p.name) for p in root.glob("*") if p.name.isdigit())
        for old in done[: -config.training.checkpoint.keep]:
            shutil.rmtree(root / str(old))
    barrier()


def load_checkpoint(checkpoint: Path, optimizer, state: TrainerState, rank: int, world: int) -> None:
    files = sorted(checkpoint.glob("optimizer-*-of-*.safetensors"))
    if len(files) != state.world_size:
        raise ConfigError(f"{checkpoint} should hold {state.world_size} optimizer shards, found {len(files)}")
    shards = [safe_open(f, framework="pt", device="cpu") for f in files]
    try:
        optimizer.load_sharded_state(shards)
    except ValueError as e:  # a damaged or foreign optimizer shard
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
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        yield
    table = profile.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=60,
                                         max_name_column_width=90)
    Path(os.environ["LLAMA_PROFILE"]).write_text(table)


@torch.no_grad()
def evaluate(model, loader: Loader, iterations: int, world: int, device) -> float:
    total, count = torch.zeros((), device=device), 0
    for _ in range(iterations):
        for tokens in loader.next_batch():
            total += model(tokens[:, :-1], tokens[:, 1:])
            count += 1
    return all_reduce_mean(total / count, world)


class Trainer:
    """One run. `__init__` builds and checks everything and writes nothing, so that any problem it finds
    leaves earlier work untouched; `train()` is the loop."""

    def __init__(self, config: Config, rank: int, world: int, device: torch.device):
        self.config, self.rank, self.world, self.device = config, rank, world, device
        t, b, m = config.training, config.batch, config.model.base_model
        self.exp = Path(config.run.experiment_dir)
        self.checkpoint = find_checkpoint(self.exp)
        self.state = (check_checkpoint(self.checkpoint, config) if self.checkpoint
                      else TrainerState(sequence_length=b.sequence_length, world_size=world))
        if m.cross_entropy_impl == "fused" and (problem := fused_cross_entropy_problem(device)):
            raise ConfigError(problem)

        # Model: built on meta, materialized and initialized on the device, the same on every rank.
        torch.manual_seed(config.model.distributed.seed)
        with torch.device("meta"):
            self.model = Llama(m, b.sequence_length, DTYPES[config.model.distributed.training_dtype])
        self.model.init_weights(device)
        if config.pretrained is not None and config.pretrained.model_weights and self.checkpoint is None:
            export.load_llama_weights(self.model, config.pretrained.path)

        seed = config.model.distributed.seed
        self.data = Data(config.data, b.sequence_length, m.vocab_size, seed, self.exp / "cache")
        for split, wanted, key in (("validation", t.validation.interval is not None, "training.validation is on"),
                                   ("test", t.test_iters > 0, f"training.test_iters is {t.test_iters}")):
            if wanted and self.data.num_samples(split) == 0:
                raise DataError(f"{key} but the {split} split of data.split {config.data.split} holds no sample")

        c = config.optimizer
        self.optimizer = ZeroAdamW(self.model, betas=(c.beta_1, c.beta_2), eps=c.epsilon, weight_decay=c.weight_decay,
                                   decays=decays, zero_stage=config.model.multi_stage.zero_stage)
        if self.checkpoint:
            load_checkpoint(self.checkpoint, self.optimizer, self.state, rank, world)
        self.model.recompute_layers = recompute_layers(config, device)  # the one place that sets it
        self.accumulation = b.batch_size // (b.micro_batch_size * world)  # micro-batches per step on each rank
        self.tokens_per_step = b.batch_size * b.sequence_length
        self.flops_per_token = flops_per_token(self.model, b.sequence_length)

    def train(self) -> None:
        t, b, exp, rank = self.config.training, self.config.batch, self.exp, self.rank
        # Nothing was written until here: every check in __init__ could fail without touching earlier work.
        if rank == 0:
            exp.mkdir(parents=True, exist_ok=True)
            (exp / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(self.config), sort_keys=False))
        self.log = Logger(exp / "metrics.jsonl", rank, self.state.step if self.checkpoint else 0)
        self.loaders = {s: Loader(self.data, s, self.state.consumed.get(s, 0), b.batch_size, b.micro_batch_size,
                                  rank, self.world, self.device) for s in ("train", "validation")}
        layers = self.config.model.base_model.transformer.num_layers
        self.log(f"{'resuming from ' + str(self.checkpoint) if self.checkpoint else 'starting'}: "
                 f"{count_parameters(self.model):,} parameters, {self.world} rank(s), {self.tokens_per_step:,} "
                 f"tokens per step, {self.accumulation} accumulation steps, "
                 f"{self.model.recompute_layers} of {layers} blocks recomputed in backward")
        if self.state.step >= t.train_iters:
            self.log(f"training already complete at step {self.state.step}")
        # tokens/s counts training steps only; grad_norm's .item() synchronizes the device once a step.
        self.interval_loss, interval_steps, interval_time = torch.zeros((), device=self.device), 0, 0.0
        profile_step = self.state.step + 3 if os.environ.get("LLAMA_PROFILE") and rank == 0 else None
        while self.state.step < t.train_iters:
            self.state.step += 1
            step, start = self.state.step, time.perf_counter()
            lr = learning_rate(self.config.optimizer.learning_rate, step, t.train_iters)
            with profiled(step == profile_step):
                grad_norm = self.train_step(lr)
            interval_steps, interval_time = interval_steps + 1, interval_time + time.perf_counter() - start
            last = step == t.train_iters
            if step % t.logs.interval == 0 or last:
                self.log_interval(self.interval_loss / interval_steps, lr, grad_norm, interval_steps / interval_time)
                self.interval_loss.zero_()
                interval_steps, interval_time = 0, 0.0
            self.on_intervals(last)
        for loader in self.loaders.values():
            loader.close()

    def train_step(self, lr: float) -> float:
        """One optimizer step: every micro-batch's forward and backward, then the AdamW update. Adds this
        rank's mean loss to interval_loss; returns the global gradient norm before clipping."""
        micro_batches = self.loaders["train"].next_batch()
        self.optimizer.zero_grad()
        for tokens in micro_batches:
            loss = self.model(tokens[:, :-1], tokens[:, 1:])
            # The loss-scaling contract. model() returns the mean loss over a micro-batch's tokens, and
            # kernels.py's fused cross-entropy makes that mean's gradient, scaled by what backward passes
            # in; zero.py then sums gradients over micro-batches and ranks. Dividing by their number
            # here makes that sum the gradient of the mean loss over the whole global batch.
            (loss / (len(micro_batches) * self.world)).backward()
            self.interval_loss += loss.detach() / len(micro_batches)
        grad_norm = self.optimizer.reduce()
        self.optimizer.update(lr, self.config.optimizer.gradient_norm_clipping, grad_norm)
        return grad_norm.item()

    def log_interval(self, loss: torch.Tensor, lr: float, grad_norm: float, steps_per_s: float) -> None:
        loss, step, world = all_reduce_mean(loss, self.world), self.state.step, self.world
        tokens_per_s = steps_per_s * self.tokens_per_step
        metrics = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                       tokens_per_s_per_gpu=tokens_per_s / world)
        text = (f"step {step}/{self.config.training.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm "
                f"{grad_norm:.3f} | {tokens_per_s:,.0f} tokens/s ({tokens_per_s / world:,.0f} per rank)")
        if self.device.type == "cuda":
            metrics.update(mfu=tokens_per_s / world * self.flops_per_token / H100_PEAK_FLOPS,
                           memory_gb=torch.cuda.max_memory_allocated() / 1e9)
            text += f" | MFU {metrics['mfu']:.1%} | peak memory {metrics['memory_gb']:.1f} GB"
        self.log(text, **metrics)

    def on_intervals(self, last: bool) -> None:
        """Validation, test, export and checkpoint, each on its interval and at the end."""
        t, b, step = self.config.training, self.config.batch, self.state.step
        if t.validation.interval is not None and (step % t.validation.interval == 0 or last):
            loss = evaluate(self.model, self.loaders["validation"], t.validation.iterations, self.world, self.device)
            self.log(f"step {step} | validation loss {loss:.4f}", step=step, val_loss=loss)
        if last and t.test_iters:
            test = Loader(self.data, "test", 0, b.batch_size, b.micro_batch_size, self.rank, self.world, self.device)
            loss = evaluate(self.model, test, t.test_iters, self.world, self.device)
            test.close()
            self.log(f"step {step} | test loss {loss:.4f}", step=step, test_loss=loss)
        if t.export.interval is not None and (step % t.export.interval == 0 or last):
            if self.rank == 0:
                # overwrite: a run that crashed after an export but before its checkpoint writes it again.
                m = self.config.model.base_model
                out = export.export_llama(cpu_state_dict(self.model), m, self.exp / "export" / "llama" / str(step),
                                          max_position_embeddings=export.context_length(m, b.sequence_length),
                                          tokenizer_path=self.data.tokenizer_path, overwrite=True)
                self.log(f"step {step} | exported to {out}")
            barrier()
        if t.checkpoint.interval is not None and (step % t.checkpoint.interval == 0 or last):
            self.state.consumed = {s: loader.consumed_samples for s, loader in self.loaders.items()}
            self.state.world_size = self.world
            save_checkpoint(self.exp, self.model, self.optimizer, self.state, self.config, self.rank, self.world)
            self.log(f"step {step} | checkpoint written to {self.exp / 'checkpoints' / str(step)}")


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
            Trainer(config, rank, world, device).train()
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
