"""Pretrain a Llama-3.1 from one YAML file in Fast-LLM's schema.

    python train.py config/tiny.yaml [section.key=value ...] [--dry-run]
    torchrun --nproc_per_node=8 train.py config/llama3_8b.yaml

One step, as the loop below reads: for each micro-batch of this rank's share of the global batch,
forward and backward (the optimizer reduce-scatters gradients as they appear); then the optimizer
clips by the global norm, updates its float32 shard and all-gathers the new weights; then log,
validate, checkpoint and export on their intervals. Everything the run writes lands in
`run.experiment_dir`; a run that finds a complete checkpoint there resumes from it exactly.
"""
import signal

if __name__ == "__main__":  # Ctrl-C while torch imports (seconds) ends the process quietly; main() restores it
    signal.signal(signal.SIGINT, signal.SIG_DFL)
import argparse  # noqa: E402 (the imports below come after that line on purpose)
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

import export
from checkpoint import (CheckpointError, Interval, TrainerState, agree, all_ok, check_checkpoint, checkpoint_steps,
                        choose_checkpoint, cpu_state_dict, due, experiment_dir_problem, leaves, load_checkpoint,
                        release_lock, rotate, save_checkpoint, naming, set_aside, take_lock, touch_lock,
                        trim_metrics, write_file)
from data import IGNORE_INDEX, Data, DataError, Loader
from model import Llama, count_parameters, flops_per_token, fused_cross_entropy_problem, kernels
from schema import TRAINING_DTYPES, Config, ConfigError, LearningRateConfig, load_config
from zero import BUCKET_BYTES, MAX_IN_FLIGHT, ZeroAdamW

H100_PEAK_FLOPS = 989e12  # dense bf16, the MFU denominator of docs/performance.md


# ---------------------------------------------------------------------------------------------
# The loop


class Trainer:
    """One run. `__init__` builds and checks everything and writes nothing, so that any problem it finds
    leaves earlier work untouched; `train()` is the loop."""

    def __init__(self, config: Config, rank: int, world: int, device: torch.device):
        self.config, self.rank, self.world, self.device = config, rank, world, device
        b, m, d = config.batch, config.model.base_model, config.model.distributed
        self.exp = Path(config.run.experiment_dir)
        fused = m.cross_entropy_impl == "fused"
        if problem := experiment_dir_problem(self.exp) or fused and fused_cross_entropy_problem(device):
            raise ConfigError(problem)
        if d.float8_matmuls and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            raise ConfigError("model.distributed.float8_matmuls needs float8 tensor cores (compute capability 8.9 or "
                              f"more: H100, H200); {torch.cuda.get_device_name(device)} has none: set it false")

        # Model: built on meta, materialized and initialized on the device, the same on every rank.
        torch.manual_seed(config.model.distributed.seed)
        with torch.device("meta"):
            self.model = Llama(m, b.sequence_length, TRAINING_DTYPES[d.training_dtype], d.float8_matmuls)
        if device.type == "cpu" and rank == 0 and (n := count_parameters(self.model)) > 1e8:  # a GPU config, no GPU
            print(f"warning: no GPU found: {n:,} parameters on the CPU take {n * 16 / 1e9:,.0f} GB with the optimizer "
                  "state, and steps take very long", file=sys.stderr)
        self.model.init_weights(device)
        source = f"the initialization (model.base_model.transformer.init_method_std {m.transformer.std})"
        resuming = bool(checkpoint_steps(self.exp))  # from a usable one, or a CheckpointError below
        if config.pretrained is not None and config.pretrained.model_weights and not resuming:
            export.load_llama_weights(self.model, config.pretrained.path)
            source = f"the weights of pretrained.path {config.pretrained.path}"
            if self.rank == 0:
                print(f"loaded pretrained weights from {config.pretrained.path}")
        c = config.optimizer
        self.optimizer = ZeroAdamW(self.model, betas=(c.beta_1, c.beta_2), eps=c.epsilon, weight_decay=c.weight_decay,
                                   decays=decays, zero_stage=config.model.multi_stage.zero_stage)
        # The newest checkpoint that its manifest vouches for and whose weights load finite; train() sets aside
        # those passed over, so that they never count as kept.
        self.checkpoint, self.state, self.passed = choose_checkpoint(self.exp, rank, world, self.load)
        if self.checkpoint is None:
            self.state = TrainerState(sequence_length=b.sequence_length)
            if not all_finite(self.model):
                raise ConfigError(f"the starting weights hold NaN or infinite values; they come from {source}")

        self.sources = data_sources(config)  # each split's Data and its name there
        self.data = self.sources["train"][0]
        self.resumed_blend, self.state.blend = self.state.blend, self.data.blend  # the checkpoint's, and ours

        self.model.recompute_layers = recompute_layers(config, device)  # the one place that sets it
        self.accumulation = b.batch_size // (b.micro_batch_size * world)  # micro-batches per step on each rank
        self.tokens_per_step = b.batch_size * b.sequence_length
        self.flops_per_token = flops_per_token(self.model, b.sequence_length)
        self.stopping = False  # every rank agreed to stop after this step (a signal)

    def train(self) -> None:
        t, exp, rank, state = self.config.training, self.exp, self.rank, self.state
        # Nothing was written until here: every check in __init__ could fail without touching earlier work.
        take_lock(exp, rank, self.world)  # released by main(), whatever happens
        error = None
        try:
            self.tracker = Tracker(self.config, exp, rank)
        except ConfigError as e:  # W&B refused: nothing is written yet
            error = e
        if not all_ok(error is None):
            raise error or ConfigError("training.wandb: Weights & Biases did not start on rank 0")
        if rank == 0:
            resolved = yaml.safe_dump(dataclasses.asdict(self.config), sort_keys=False)
            write_file(exp / "config.yaml", [resolved.encode()])
            set_aside(self.passed)
            rotate(exp, t.checkpoint.keep, self.checkpoint)  # after a kill between a rename and its rotation
            trim_metrics(exp / "metrics.jsonl", state.step)
        self.loaders = {s: self.loader(s, state.consumed.get(s, 0)) for s in ("train", "validation")}
        self.log(f"{'resuming from ' + str(self.checkpoint) if self.checkpoint else 'starting'}: "
                 f"{count_parameters(self.model):,} parameters, {self.world} rank(s), {self.tokens_per_step:,} tokens "
                 f"per step, {self.accumulation} accumulation steps, {self.model.recompute_layers} of "
                 f"{len(self.model.layers)} blocks recomputed in backward",
                 **({"step": state.step, "resumed": True} if self.checkpoint and state.step < t.train_iters else {}))
        if self.checkpoint:
            self.log_resume_changes()
        for warning in self.data.warnings:
            self.log(f"warning: {warning}")
        if state.step >= t.train_iters:
            self.log(f"training already complete at step {state.step}")
        # The log interval so far (restored on resume), its loss sum on the device; the wall clock, for the ETA.
        # Each rank holds its own loss sum (the log adds them up); resumed on another world size, rank 0 the total.
        self.interval, losses = state.interval, state.interval.losses
        mine = losses[rank] if len(losses) == self.world else sum(losses) if rank == 0 else 0.0
        self.interval_loss = torch.tensor(mine, dtype=torch.float32, device=self.device)
        self.started, self.last_log = time.time() - state.elapsed_s, (time.time(), state.step)
        profile_step = state.step + 3 if os.environ.get("LLAMA_PROFILE") and rank == 0 else None
        self.stop = Stop()
        try:
            while state.step < t.train_iters and not self.stopping:
                state.step += 1
                step, start = state.step, time.perf_counter()
                lr = lr_at(self.config.optimizer.learning_rate, step, t.train_iters)
                with profiled() if step == profile_step else contextlib.nullcontext():
                    grad_norm, problem = self.train_step(lr)
                touch_lock(exp, rank)
                self.interval.steps += 1
                self.interval.seconds += time.perf_counter() - start
                if problem:
                    state.skipped_in_a_row += 1
                    self.log(f"step {step} | skipped: {problem}", step=step, skipped=problem)
                    if state.skipped_in_a_row > t.max_skipped_steps:
                        raise NonFinite(f"stopped at step {step}: {state.skipped_in_a_row} steps in a row had a "
                                        f"non-finite loss or gradient (training.max_skipped_steps is "
                                        f"{t.max_skipped_steps}). Lower the learning rate or look at the data, "
                                        "then run again: it resumes from the newest checkpoint.")
                else:
                    state.skipped_in_a_row = 0
                    self.interval.finite_steps += 1
                last = step == t.train_iters
                # Every logs.interval steps, and at steps 1, 2, 4, 8, ... before the first one: early signs.
                early = step < t.logs.interval and step & (step - 1) == 0
                if (step % t.logs.interval == 0 or last or early) and self.interval.finite_steps:
                    self.log_interval(self.interval_loss / self.interval.finite_steps, lr, grad_norm)
                self.on_intervals(last)
                if self.stopping and not last:
                    self.log(f"stopped at step {step}; run the same command to resume")
        except BaseException as e:
            self.tracker.alert("run failed", f"at step {state.step}: {e!r}")
            raise
        finally:
            self.stop.restore()
            self.tracker.finish(f"{'stopped' if self.stopping else 'ended'} at step {state.step}")
            for loader in self.loaders.values():
                loader.close()

    def loader(self, split: str, consumed: int = 0) -> Loader:
        """This rank's batches of `split`, from the `consumed`-th global sample on."""
        (data, name), b = self.sources[split], self.config.batch
        return Loader(data, name, consumed_samples=consumed, batch_size=b.batch_size,
                      micro_batch_size=b.micro_batch_size, rank=self.rank, world_size=self.world, device=self.device,
                      documents=not b.cross_document_attention)

    def log_resume_changes(self) -> None:
        """A resume that changed the schedule, the batch or the data since its checkpoint says what moved, in the
        log and in metrics.jsonl ({"step", "changed": {key: [before, now]}}); for the schedule, the learning rate."""
        saved, now = yaml.safe_load((self.checkpoint / "config.yaml").read_text()), dataclasses.asdict(self.config)
        old, new = (leaves({"training.train_iters": c["training"]["train_iters"],
                            "optimizer.learning_rate": c["optimizer"]["learning_rate"],
                            "batch": c["batch"], "data": c["data"]}) for c in (saved, now))
        changed = {k: [old.get(k), v] for k, v in new.items() if old.get(k) != v}
        moved = [f"{k} {a} -> {b}" for k, (a, b) in changed.items()]
        if self.resumed_blend and self.resumed_blend != self.data.blend:  # the same data.path, other files or weights
            changed["blend"] = [self.resumed_blend, self.data.blend]
            moved.append("the datasets read or their weights (blend: see metrics.jsonl)")
        if not changed:
            return
        step, c, t = self.state.step + 1, self.config.optimizer.learning_rate, self.config.training
        if any(k.startswith(("training.", "optimizer.")) for k in changed):
            lr = LearningRateConfig(**saved["optimizer"]["learning_rate"])
            moved[-1] += (f". The learning rate of step {step} is {lr_at(c, step, t.train_iters):.4e} (it would have "
                          f"been {lr_at(lr, step, saved['training']['train_iters']):.4e})")
        self.log(f"changed since the checkpoint: {'; '.join(moved)}", step=self.state.step, changed=changed)

    def train_step(self, lr: float) -> tuple[float, str | None]:
        """One optimizer step: every micro-batch's forward and backward, then, if the loss and the
        gradients are finite on every rank, the AdamW update. Returns the global gradient norm before
        clipping, and why the step was skipped (None if it was not)."""
        micro_batches = self.loaders["train"].next_batch()
        # The step's loss is the mean over its labelled tokens on all ranks, as Fast-LLM's (labels in a
        # loss-masking span don't count): each micro-batch's mean weighs in by its share of them, which is
        # 1 / (micro-batches x ranks) when no label is masked. A micro-batch with no label adds nothing.
        counts = [(labels != IGNORE_INDEX).sum() for _, labels, _ in micro_batches]
        total = sum(counts)
        if self.world > 1:
            dist.all_reduce(total)
        self.optimizer.zero_grad()
        interval_loss = self.interval_loss.clone()  # becomes the interval's sum if the step is kept
        for (inputs, labels, documents), count in zip(micro_batches, counts):
            # The loss-scaling contract: model() returns the mean loss over a micro-batch's labelled tokens,
            # kernels.py's fused cross-entropy makes that mean's gradient, scaled by what backward passes in,
            # and zero.py sums gradients over micro-batches and ranks. Weighting each micro-batch by its
            # share of the step's labels makes that sum the gradient of the step's mean loss.
            loss = torch.where(count > 0, self.model(inputs, labels, documents) * count / total, 0.0)
            loss.backward()
            interval_loss += loss.detach()  # this rank's share of the step's mean; the log adds the ranks' up
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
        if self.world > 1:
            dist.all_reduce(loss)
        loss, step, world, t = loss.item(), self.state.step, self.world, self.config.training
        interval, now, b = self.interval, time.time(), self.config.batch
        tokens_per_s = interval.steps * self.tokens_per_step / interval.seconds
        eta = (t.train_iters - step) * (now - self.last_log[0]) / (step - self.last_log[1])
        elapsed, tokens = now - self.started, self.loaders["train"].consumed_samples * b.sequence_length
        metrics = dict(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                       tokens_per_s_per_gpu=tokens_per_s / world, tokens=tokens, elapsed_s=elapsed)
        text = (f"step {step}/{t.train_iters} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
                f"{tokens_per_s:,.0f} tokens/s ({tokens_per_s / world:,.0f} per rank) | {tokens / 1e6:,.2f}M tokens | "
                f"{interval.seconds / interval.steps:.3f} s/step | elapsed {clock(elapsed)} | ETA {clock(eta)}")
        if self.device.type == "cuda":
            metrics.update(mfu=tokens_per_s / world * self.flops_per_token / H100_PEAK_FLOPS,
                           memory_gb=torch.cuda.max_memory_allocated() / 1e9)
            text += f" | MFU {metrics['mfu']:.1%} | peak memory {metrics['memory_gb']:.1f} GB"
        self.log(text, **metrics)
        alert = t.wandb.alert.interval
        if alert and step % alert == 0:
            self.tracker.alert(f"step {step}", f"loss {loss:.4f}, {tokens_per_s:,.0f} tokens/s", status=True)
        self.interval_loss.zero_()
        self.interval, self.last_log = Interval(), (now, step)

    def on_intervals(self, last: bool) -> None:
        """Validation, test, export and checkpoint, each on its interval and at the end; a stop checkpoints."""
        t, step = self.config.training, self.state.step
        if due(t.validation.interval, step, last):
            loss = evaluate(self.model, self.loaders["validation"], t.validation.iterations, self.world, self.device)
            self.log(f"step {step} | validation loss {loss:.4f}", step=step, val_loss=loss)
        if last and t.test_iters:
            with contextlib.closing(self.loader("test")) as test:
                loss = evaluate(self.model, test, t.test_iters, self.world, self.device)
            self.log(f"step {step} | test loss {loss:.4f}", step=step, test_loss=loss)
        if due(t.checkpoint.interval, step, last) or self.stopping:  # first: an export that fails loses no step
            self.write_checkpoint()
        if due(t.export.interval, step, last):
            self.write_export()

    def write_export(self) -> None:
        error, step, m = None, self.state.step, self.config.model.base_model
        context, tokenizer = export.context_length(m, self.config.batch.sequence_length), self.data.tokenizer_path
        if self.rank == 0:
            try:  # overwrite: a run that crashed after an export but before its checkpoint writes it again.
                folder = self.exp / "export" / "llama" / str(step)
                export.export_llama(cpu_state_dict(self.model), m, folder, max_position_embeddings=context,
                                    tokenizer_path=tokenizer, overwrite=True)
                self.log(f"step {step} | exported to {folder}")
            except OSError as e:
                error = e
        agree(error, f"the export of step {step}")

    def write_checkpoint(self) -> None:
        self.state.consumed = {s: loader.consumed_samples for s, loader in self.loaders.items()}
        losses = [self.interval_loss.clone() for _ in range(self.world)]
        if self.world > 1:
            dist.all_gather(losses, self.interval_loss)
        self.state.interval = dataclasses.replace(self.interval, losses=[loss.item() for loss in losses])
        self.state.elapsed_s = time.time() - self.started
        self.state.world_size, self.state.weights_finite = self.world, all_finite(self.model)
        save_checkpoint(self.exp, self.model, self.optimizer, self.state, self.config, self.rank, self.world)
        self.log(f"step {self.state.step} | checkpoint written to {self.exp / 'checkpoints' / str(self.state.step)}")

    def log(self, text: str, **metrics) -> None:
        """Rank 0 prints, appends JSON lines to metrics.jsonl and hands them to W&B; other ranks stay quiet."""
        if self.rank == 0:
            print(text, flush=True)
        if self.rank == 0 and metrics:
            metrics["time"] = round(time.time(), 3)
            with naming(self.exp / "metrics.jsonl"), (self.exp / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            self.tracker.log(metrics)

    def load(self, checkpoint: Path, state: TrainerState) -> str | None:
        """Resume from `checkpoint`; what makes it unusable, or None. Another model's checkpoint is refused."""
        check_checkpoint(checkpoint, state, self.config)
        load_checkpoint(checkpoint, self.optimizer, state, self.rank, self.world)
        return None if all_ok(all_finite(self.model)) else "its weights hold NaN or infinite values"


# ---------------------------------------------------------------------------------------------
# Policies the trainer owns and hands down: the learning-rate schedule, weight decay, recomputation


def lr_at(c: LearningRateConfig, step: int, train_iters: int) -> float:
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
    itemsize = TRAINING_DTYPES[config.model.distributed.training_dtype].itemsize
    world = dist.get_world_size() if dist.is_initialized() else 1
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # PyTorch's cache is reusable
    head = m.vocab_size * t.hidden_size
    stage2 = config.model.multi_stage.zero_stage == 2 and world > 1  # float32 staging: the head's own bucket and
    staging = 4 * (head + MAX_IN_FLIGHT * BUCKET_BYTES // itemsize) if stage2 else 0  # those in flight

    def budget(micro_batch: int) -> tuple[float, int, int]:
        """(memory for the blocks, bytes a kept block holds, bytes a recomputed one holds)"""
        tokens = micro_batch * b.sequence_length
        kept, recomputed = tokens * t.activation_bytes(itemsize), tokens * t.hidden_size * itemsize
        fused = m.cross_entropy_impl != "torch" and kernels is not None  # a logits chunk and the hidden's gradient
        loss = kernels.LOGITS_CHUNK_BYTES + recomputed if fused else 16 * tokens * m.vocab_size  # or all logits x 16
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
# Around the loop: W&B, profiling, signals, blow-ups, evaluation


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
        try:
            self.run = wandb.init(id=run_id, resume="allow", entity=c.entity_name, project=c.project_name,
                                  group=c.group_name, name=exp.name, dir=exp, config=dataclasses.asdict(config))
        except wandb.Error as e:  # not logged in, no network: before anything is written
            raise ConfigError(f"training.wandb: Weights & Biases would not start ({e}); log in (`wandb login`), or "
                              "set WANDB_MODE=offline, which needs no network, or remove training.wandb") from None
        id_file.write_text(run_id)
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


@contextlib.contextmanager
def profiled():
    """LLAMA_PROFILE=FILE: rank 0 profiles its third step and writes the operations by device time."""
    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profile:
        yield
    table = profile.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=60,
                                         max_name_column_width=90)
    Path(os.environ["LLAMA_PROFILE"]).write_text(table)


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
        """Back to the handlers before: the process outlives the run (tests, or a caller of main()). Not before
        half a second has passed since a signal: a relayed copy of it arriving after the loop still counts as one."""
        if self.requested is not None:
            time.sleep(max(0.0, self.requested + 0.5 - time.time()))
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.requested is not None and time.time() - self.requested > 0.5:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.requested = self.requested or time.time()


def all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@torch.no_grad()
def evaluate(model, loader: Loader, iterations: int, world: int, device) -> float:
    """The mean loss over all labelled tokens of the pass, on all ranks."""
    sums = torch.zeros(2, device=device)  # the loss summed over labelled tokens, and their number
    for _ in range(iterations):
        for inputs, labels, documents in loader.next_batch():
            count = (labels != IGNORE_INDEX).sum()
            sums += torch.stack([torch.where(count > 0, model(inputs, labels, documents) * count, 0.0), count.float()])
    if world > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


# ---------------------------------------------------------------------------------------------
# Entry point


HELP = """CONFIG.yaml holds Fast-LLM's sections (training, batch, data, optimizer, model.base_model, model.multi_stage,
model.distributed, run, pretrained): every key, its default and the exit codes are in docs/schema.md.

examples:
  python train.py config/tiny.yaml training.train_iters=200
  torchrun --nproc_per_node=8 train.py config/llama3_8b.yaml data.path=data/mine/fast_llm_dataset.json"""


def data_sources(config: Config) -> dict[str, tuple[Data, str]]:
    """Each split's Data and its name there, checked: the training data, and training.validation.path's if set."""
    t, b, m, exp = config.training, config.batch, config.model.base_model, Path(config.run.experiment_dir)
    # The samples each split's reader takes over the whole run (data.sampling.shuffle: full shuffles over them).
    passes = t.train_iters // t.validation.interval + 1 if t.validation.interval else 0
    horizon = {"train": t.train_iters, "validation": passes * (t.validation.iterations or 0), "test": t.test_iters}
    horizon = {split: steps * b.batch_size for split, steps in horizon.items()}
    data = Data(config.data, b.sequence_length, m.vocab_size, cache_dir=exp / "cache", horizon=horizon)
    sources = {s: (data, s) for s in ("train", "validation", "test")}
    if t.validation.path is not None:  # a dataset of its own, read whole: the train split of a [1, 0, 0] split
        own = dataclasses.replace(config.data, format="file", path=t.validation.path, split=[1, 0, 0])
        try:
            sources["validation"] = (Data(own, b.sequence_length, m.vocab_size, cache_dir=exp / "cache",
                                          horizon={"train": horizon["validation"]}), "train")
        except DataError as e:
            raise DataError(f"training.validation.path {own.path} (the validation dataset): {e}") from None
    for split, wanted, key in (("validation", t.validation.interval is not None, "training.validation is on"),
                               ("test", t.test_iters > 0, f"training.test_iters is {t.test_iters}")):
        if wanted and sources[split][0].num_samples(sources[split][1]) == 0:
            raise DataError(f"{key} but the {split} split of data.split {config.data.split} holds no sample")
    return sources


def dry_run(config: Config, rank: int, world: int) -> None:
    with torch.device("meta"):
        model = Llama(config.model.base_model, config.batch.sequence_length)
    if config.pretrained is not None and config.pretrained.model_weights:
        export.load_llama_weights(model, config.pretrained.path)  # names and shapes only, from the headers
    exp = Path(config.run.experiment_dir)  # writable, not in use, and its checkpoints of this model
    if problem := experiment_dir_problem(exp):
        raise ConfigError(problem)
    choose_checkpoint(exp, rank, world, lambda checkpoint, state: check_checkpoint(checkpoint, state, config))
    b, d = config.batch, config.data
    # The data, if here (a login node may not see it): files, splits, tokens; reads an old run's cache, writes none.
    if checked := d.format == "random" or Path(d.path).is_file():
        data_sources(config)
    if rank == 0:
        print(f"parameters: {count_parameters(model)}\ntokens per step: {b.batch_size * b.sequence_length}\n"
              f"accumulation steps: {b.batch_size // (b.micro_batch_size * world)}"
              + ("" if checked else f"\ndata: {d.path} not found here, not checked"))


def launched() -> tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher tells them: torchrun's variables, else those of a Slurm step
    (`srun` starting one task per GPU, which signals every task itself), else one process."""
    env = os.environ
    if "RANK" not in env and "SLURM_STEP_NUM_TASKS" in env:  # srun, not a salloc shell: the step's own tasks
        env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_STEP_NUM_TASKS"], LOCAL_RANK=env["SLURM_LOCALID"])
        if int(env["WORLD_SIZE"]) > 1 and "MASTER_ADDR" not in env:
            raise ConfigError("srun started several tasks but MASTER_ADDR is not set: export MASTER_ADDR=$(scontrol "
                              'show hostnames "$SLURM_JOB_NODELIST" | head -n 1) MASTER_PORT=29500 before srun')
        env.setdefault("MASTER_PORT", "29500")
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="train.py", description="Pretrain a Llama-3.1 from one YAML file in Fast-LLM's schema.", epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", metavar="CONFIG.yaml", help="the training configuration")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override any key by its dotted path; the value is read as YAML (data.split=[98,1,1])")
    parser.add_argument("--dry-run", action="store_true", help="check the config (and a pretrained folder's shapes), "
                        "print the parameter count, the tokens per step and the accumulation steps, write nothing")
    if all(a.startswith("-") for a in argv) and not {"-h", "--help"} & set(argv):  # argparse would ask for both
        parser.error("the following argument is required: CONFIG.yaml")
    args = parser.parse_intermixed_args(argv)
    if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:  # set while the imports ran
        signal.signal(signal.SIGINT, signal.default_int_handler)
    rank = 0
    try:
        rank, world, local_rank = launched()
        config = load_config(args.config, args.overrides, world)
        if args.dry_run:
            dry_run(config, rank, world)
            return 0
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            Trainer(config, rank, world, device).train()
        finally:
            release_lock(Path(config.run.experiment_dir), rank)
            if dist.is_initialized():
                dist.destroy_process_group()
    except (NonFinite, ConfigError, DataError, export.ExportError, CheckpointError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFinite) else 2
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
