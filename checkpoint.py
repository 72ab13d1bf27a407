"""Everything under run.experiment_dir that must survive a crash: the trainer state, checkpoints written with
a manifest of hashes, their damage checks, choosing, saving, rotating and loading, and the checks that the
folder is writable and shared by every rank.

Checkpoints: checkpoints/STEP/ holds the model weights (rank 0), each rank's optimizer shard and
random state, the trainer state, and manifest.json: every file's size and SHA-256, computed while
the file is written. It is written as checkpoints/.tmp-STEP and renamed once every rank has
finished, so a run killed mid-write leaves nothing that looks complete. A resume verifies the
newest checkpoint against its manifest and falls back to an older one if it is damaged.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors import SafetensorError, safe_open

EXECUTION_ONLY = ("cross_entropy_impl", "recompute_layers")  # model keys a resumed run may change
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


class CheckpointError(Exception):
    """A checkpoint that can't be used, or a checkpoint or export that could not be written (a full disk)."""


@dataclass
class Interval:
    """The log interval so far, kept so that the first line logged after a resume is the one an uninterrupted run
    logs."""
    losses: list[float] = field(default_factory=lambda: [0.0])  # the loss summed over its finite steps
    finite_steps: int = 0  # steps whose loss and gradients were finite (the mean's divisor)
    steps: int = 0  # all its steps, skipped ones included
    seconds: float = 0.0  # the time its steps took (for tokens/s)


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
    interval: Interval = field(default_factory=Interval)  # the log interval so far
    blend: list = field(default_factory=list)  # [dataset, tokens, share] read: a resume says if they changed


def read_state(checkpoint: Path) -> TrainerState:
    """A checkpoint's trainer.json; one written before Interval was a record keeps it as a list."""
    saved = json.loads((checkpoint / "trainer.json").read_text())
    interval = saved.pop("interval", {})
    if isinstance(interval, list):  # [the loss sum, finite steps, steps, seconds]
        interval = dict(losses=interval[:1], finite_steps=interval[1], steps=interval[2], seconds=interval[3])
    state = TrainerState(**saved, interval=Interval(**interval))
    counts = [state.step, state.sequence_length - 1, state.world_size - 1, *state.consumed.values()]
    if not all(type(n) is int and n >= 0 for n in counts):  # a writer's fault: nothing to resume from
        raise ValueError(f"{checkpoint / 'trainer.json'} holds impossible values (step {state.step!r}, sequence "
                         f"length {state.sequence_length!r}, {state.world_size!r} ranks, consumed {state.consumed!r})")
    return state


def due(interval: int | None, step: int, last: bool) -> bool:
    """Whether something done every `interval` steps (None: never), and at the end, is done at `step`."""
    return interval is not None and (step % interval == 0 or last)


@contextlib.contextmanager
def naming(path: Path):
    """An OSError raised inside names `path` if it names no file (a write to a full disk names none)."""
    try:
        yield
    except OSError as e:
        e.filename = e.filename or str(path)
        raise


def write_file(path: Path, chunks) -> dict:
    """Write the byte chunks to `path`, hashing them on the way: the manifest entry of the file."""
    digest, size = hashlib.sha256(), 0
    with naming(path), path.open("wb") as f:
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


def shard_name(rank: int, world: int) -> str:
    return f"optimizer-{rank:05d}-of-{world:05d}.safetensors"


def damage(checkpoint: Path, rank: int = 0, world: int = 1) -> str | None:
    """What makes a checkpoint unusable, or None. Its manifest must list every file a resume or an export reads
    (nothing else is read), each of the listed size and hash, and the weights must be marked finite. Every rank
    checks the sizes; file i is hashed by rank i mod world, and the ranks share what they found."""
    problems = []
    try:
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        for i, (name, entry) in enumerate(sorted(manifest.items())):
            path = checkpoint / name
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                problems.append(f"{path} is missing or has the wrong size")
            elif i % world == rank and sha256(path) != entry["sha256"]:
                problems.append(f"{path} does not match its checksum")
        state = read_state(checkpoint)
        json.loads((checkpoint / "model_config.json").read_text())
        needed = ["model.safetensors", "model_config.json", "config.yaml", "trainer.json",
                  *(shard_name(r, state.world_size) for r in range(state.world_size))]
        if unlisted := [name for name in needed if name not in manifest]:
            problems.append(f"{checkpoint / 'manifest.json'} does not vouch for {', '.join(unlisted)}")
        if not state.weights_finite:
            problems.append(f"{checkpoint} holds non-finite weights")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problems.append(f"{checkpoint}: {e}")
    if world > 1:
        found = [None] * world
        dist.all_gather_object(found, problems)
        problems = sorted({p for rank_problems in found for p in rank_problems})
    return "; ".join(problems) or None


def choose_checkpoint(exp: Path, rank: int, world: int, load) -> tuple[Path | None, TrainerState | None, list[Path]]:
    """The newest checkpoint that `damage` passes and `load(checkpoint, state)` takes (it loads what it needs and
    returns what is wrong with it, or None), its trainer state, and those passed over, newest first, each named in
    a warning. (None, None, []) if the run has none; a CheckpointError if it has some but none can be used."""
    passed, problems = [], []
    for step in checkpoint_steps(exp):
        checkpoint = exp / "checkpoints" / str(step)
        if (problem := damage(checkpoint, rank, world)) is None:
            state = read_state(checkpoint)
            if (problem := load(checkpoint, state)) is None:
                return checkpoint, state, passed
        passed.append(checkpoint)
        problems.append(problem)
        if rank == 0:
            print(f"warning: checkpoint {checkpoint} can't be used ({problem}); trying an older one", file=sys.stderr)
    if passed:
        raise CheckpointError(f"no usable checkpoint in {exp / 'checkpoints'}: {'; '.join(problems)}. Move that "
                              "folder away to start from scratch.")
    return None, None, []


def set_aside(checkpoints: list[Path]) -> None:
    """Rename checkpoints passed over at start to damaged-STEP: never rotated or deleted, yours to look at."""
    for checkpoint in checkpoints:
        aside = checkpoint.with_name(f"damaged-{checkpoint.name}")
        while aside.exists() or aside.is_symlink():
            aside = aside.with_name(aside.name + "+")
        checkpoint.rename(aside)
        print(f"checkpoint {checkpoint} can't be used: set aside as {aside}")


def check_checkpoint(checkpoint: Path, state: TrainerState, config) -> None:
    """Refuse a checkpoint written by another model or for another sequence length (not a reason to fall back)."""
    saved = json.loads((checkpoint / "model_config.json").read_text())
    ours = dataclasses.asdict(config.model.base_model)
    for key in EXECUTION_ONLY:
        saved.pop(key, None), ours.pop(key, None)
    if saved != ours:
        saved, ours = leaves(saved), leaves(ours)
        diff = [f"{k}: {saved.get(k)!r} there, {ours.get(k)!r} here"
                for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
        raise CheckpointError(
            f"{checkpoint} was written by a different model than model.base_model describes "
            f"({'; '.join(diff)}). Use another run.experiment_dir, or the model that wrote it."
        )
    if state.sequence_length != config.batch.sequence_length:
        raise CheckpointError(f"{checkpoint} was trained with batch.sequence_length {state.sequence_length}, "
                              f"not {config.batch.sequence_length}")


def leaves(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested mapping's leaves (to name the keys where two configs differ)."""
    return {p: v for k, value in tree.items()
            for p, v in (leaves(value, f"{prefix}{k}.") if isinstance(value, dict) else {prefix + k: value}).items()}


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


def save_checkpoint(exp: Path, model, optimizer, state: TrainerState, config, rank: int, world: int):
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
        name = shard_name(rank, world)
        manifest = {name: write_file(tmp / name, safetensors_chunks(tensors))}
        if rank == 0:
            weights = safetensors_chunks(model.state_dict())
            manifest["model.safetensors"] = write_file(tmp / "model.safetensors", weights)
            model_config = json.dumps(dataclasses.asdict(config.model.base_model), indent=2)
            for name, text in (("model_config.json", model_config),
                               ("config.yaml", yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)),
                               ("trainer.json", json.dumps(dataclasses.asdict(state), indent=2))):
                manifest[name] = write_file(tmp / name, [text.encode()])
    except OSError as e:
        error, manifest = e, {}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, manifest)
        manifest = {k: v for part in gathered for k, v in part.items()}
    remove_tmp = lambda: rank == 0 and remove(tmp)  # noqa: E731
    agree(error, f"checkpoint {final}", remove_tmp)
    if rank == 0:
        try:
            write_file(tmp / "manifest.json", [json.dumps(manifest, indent=1).encode()])
            remove(final)
            tmp.rename(final)
        except OSError as e:
            error = e
    agree(error, f"checkpoint {final}", remove_tmp)
    if rank == 0:
        rotate(exp, config.training.checkpoint.keep)
    barrier()


def rotate(exp: Path, keep: int, resumed: Path | None = None) -> None:
    """Delete all but the newest `keep` checkpoints, the newest one with finite weights, and `resumed`, the one
    this run started from: newer ones may be damaged (passed over at start), so it may be the only good one."""
    steps, kept_finite = checkpoint_steps(exp), False
    for i, step in enumerate(steps):
        checkpoint, finite = exp / "checkpoints" / str(step), False  # unreadable: not known to be finite
        with contextlib.suppress(OSError, ValueError, AttributeError):
            finite = read_state(checkpoint).weights_finite
        if i >= keep and checkpoint != resumed and (kept_finite or not finite):
            remove(checkpoint)
        kept_finite = kept_finite or finite


def load_checkpoint(checkpoint: Path, optimizer, state: TrainerState, rank: int, world: int) -> None:
    """Set the optimizer (and through it the weights) from the shards the manifest vouches for, and this rank's
    random state if the run continues on as many ranks."""
    try:
        shards = [safe_open(checkpoint / shard_name(r, state.world_size), framework="pt", device="cpu")
                  for r in range(state.world_size)]
        optimizer.load_sharded_state(shards)
    except (ValueError, SafetensorError) as e:  # a foreign optimizer shard, or one its writer garbled
        raise CheckpointError(f"{checkpoint}: {e}") from None
    if world == state.world_size:  # the same ranks continue with their own random streams
        own = shards[rank]
        torch.set_rng_state(own.get_tensor("rng/cpu"))
        if torch.cuda.is_available() and "rng/cuda" in own.keys():
            torch.cuda.set_rng_state(own.get_tensor("rng/cuda"))


def remove(path: Path) -> None:
    """Delete a file or folder; a symlink is unlinked (what it points to is not ours to delete)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def cpu_state_dict(model) -> dict[str, torch.Tensor]:
    # Copies: the parameters are views into the optimizer's flat buffers, which safetensors refuses.
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def barrier():
    if dist.is_initialized():
        dist.barrier()


STALE_S = 900  # a lock of another host untouched this long is its run's, gone (it touches the lock every step)


def lock_holder(exp: Path) -> str | None:
    """Who holds run.experiment_dir's lock, if a live run does: 'host H, pid P, since T'. A lock left by a run
    that is gone (on this host: no such process; on another: untouched for STALE_S seconds) counts as free."""
    try:
        holder = json.loads((exp / "lock").read_text())
        age = time.time() - (exp / "lock").stat().st_mtime
        host, pid = holder["host"], int(holder["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no lock, or half written by a run killed while taking it
    if host == socket.gethostname():
        if pid == os.getpid():  # not taken yet by this process: a container restarted gives the same pids again
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # another user's live process
    elif age > STALE_S:
        return None
    return f"host {host}, pid {pid}, since {holder.get('since')}"


def take_lock(exp: Path, rank: int, world: int) -> None:
    """Create the experiment folder and take its lock (rank 0), so that one run at a time writes there; remove what
    interrupted checkpoint writes left. With several ranks, check that all see the folder, that is that it is on
    a file system they share (the checkpoints need that). Before anything else is written there."""
    error, created = None, rank == 0 and not exp.exists()
    if rank == 0:
        exp.mkdir(parents=True, exist_ok=True)
        mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%F %T")})
        try:  # created only if absent, atomically (also on NFS and Lustre): of two runs starting, one gets it
            with open(exp / "lock", "x") as f:
                f.write(mine)
        except FileExistsError:
            if not (error := in_use(exp)):
                print(f"warning: {exp / 'lock'}: the run that took it is gone; taking it over", file=sys.stderr)
                (exp / f".lock-{os.getpid()}").write_text(mine)
                (exp / f".lock-{os.getpid()}").replace(exp / "lock")
        if error is None:
            for leftover in (exp / "checkpoints").glob(".tmp-*"):  # a checkpoint whose write was interrupted
                shutil.rmtree(leftover, ignore_errors=True)
    if not all_ok(error is None):
        raise CheckpointError(error or f"run.experiment_dir {exp}: refused on rank 0 (its message says why)")
    if world > 1:
        probe = [f".shared-{os.getpid()}"]  # rank 0's (the pid differs between ranks)
        if rank == 0:
            (exp / probe[0]).write_text("")
        dist.broadcast_object_list(probe, src=0)
        seen = all_ok((exp / probe[0]).exists())
        if rank == 0:
            (exp / probe[0]).unlink()
        if not seen:
            release_lock(exp, rank)
            if created:
                shutil.rmtree(exp, ignore_errors=True)
            raise CheckpointError(f"run.experiment_dir {exp} is not the same folder on every rank: it must be on "
                                  "a file system that all nodes share (checkpoints are written by every rank, read by "
                                  "any)")


def touch_lock(exp: Path, rank: int) -> None:
    """Rank 0 says, once a step, that its run is alive (see STALE_S)."""
    with contextlib.suppress(OSError):
        if rank == 0:
            os.utime(exp / "lock")


def release_lock(exp: Path, rank: int) -> None:
    """Rank 0 removes the lock if it is this process's, and the folder if the run wrote nothing else there."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        if rank == 0 and json.loads((exp / "lock").read_text())["pid"] == os.getpid():
            (exp / "lock").unlink()
            exp.rmdir()  # only if empty


def experiment_dir_problem(exp: Path) -> str | None:
    """Why the run could not write into `exp`, found before anything is written, or None."""
    existing = exp
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"run.experiment_dir {exp}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"run.experiment_dir {exp}: {existing} is not writable (a read-only file system, or permissions)"
    if files := [str(exp / name) for name in ("checkpoints", "export", "cache") if (exp / name).is_file()]:
        return f"run.experiment_dir {exp}: {', '.join(files)} must be a folder, not a file; move it away"
    if (exp / "config.yaml").exists() and not (exp / "metrics.jsonl").exists():
        return (f"run.experiment_dir {exp} holds a config.yaml that no run of this project wrote (there is no "
                "metrics.jsonl beside it): a run writes its resolved config there; move yours, or use another folder")
    return in_use(exp)


def in_use(exp: Path) -> str | None:
    if holder := lock_holder(exp):
        return f"run.experiment_dir {exp} is in use by another run ({holder}); one run writes there at a time"
    return None


def trim_metrics(path: Path, keep_until: int) -> None:
    """Drop what an interrupted run logged to metrics.jsonl after the checkpoint this run starts from (everything,
    for a fresh start), so that the file reads as one run; and a line cut short by a crash or a full disk."""
    if not path.exists():
        return
    path, kept = path.resolve(), []  # a symlink stays one: its target is rewritten
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            if json.loads(line)["step"] <= keep_until:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            if line.strip():
                print(f"warning: {path} line {number} is not a whole record (a crash mid-write?); dropped",
                      file=sys.stderr)
    tmp = path.with_suffix(".tmp")
    write_file(tmp, ["".join(line + "\n" for line in kept).encode()])
    tmp.replace(path)
