"""What a long run meets besides a clean finish: blow-ups, damaged checkpoints, full disks, signals,
kill -9 at random moments, bad experiment folders. Each case ends either bit-exact against an
uninterrupted run or in a one-paragraph error with nothing lost."""
import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import export
import train
from test_train import ROOT, Killed, metrics, setup, torchrun  # noqa: F401 (setup is a fixture)

KEYS = ("loss", "grad_norm", "lr", "val_loss", "test_loss")


def reference(config: Path, exp: Path, *overrides: str, launch=None) -> tuple[dict, dict]:
    """An uninterrupted run's metrics and final weights; the folder is emptied for the run under test."""
    if launch is None:
        assert train.main([str(config), *overrides]) == 0
    else:
        launch(config, *overrides)
    result = {k: metrics(exp, k) for k in KEYS}, load_file(exp / "checkpoints" / "12" / "model.safetensors")
    subprocess.run(["rm", "-rf", str(exp)], check=True)
    return result


def assert_same_run(exp: Path, expected: tuple[dict, dict]) -> None:
    values, weights = expected
    for key, value in values.items():
        assert metrics(exp, key) == value, key  # bit for bit, no line missing or repeated
    final = load_file(exp / "checkpoints" / "12" / "model.safetensors")
    assert final.keys() == weights.keys() and all(torch.equal(final[k], v) for k, v in weights.items())


def crash_at(monkeypatch, step: int) -> None:
    real = train.lr_at

    def crash(c, s, iters):
        if s == step:
            raise Killed()
        return real(c, s, iters)

    monkeypatch.setattr(train, "lr_at", crash)


# ---------------------------------------------------------------------------------------------
# Non-finite steps


def test_blow_up_is_skipped_then_stops_with_exit_3(setup, capsys):
    config, exp = setup
    # An init std of 1e30: the weights are finite, the activations overflow; every step is non-finite.
    args = [str(config), "model.base_model.transformer.init_method_std=1e30", "training.max_skipped_steps=2"]
    assert train.main(args) == 3
    err = capsys.readouterr().err
    assert "stopped at step 3: 3 steps in a row had a non-finite loss or gradient" in err and "Traceback" not in err
    lines = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and all(line["skipped"].startswith("non-finite") for line in lines)
    assert not (exp / "checkpoints").exists()


def test_non_finite_weights_never_rotate_out_the_last_finite_checkpoint(setup, monkeypatch, capsys):
    config, exp = setup
    from zero import ZeroAdamW

    real = ZeroAdamW.update

    def blow_up_at_step_7(self, lr, max_grad_norm, norm):
        real(self, lr, max_grad_norm, norm)
        if self.step_count == 7:
            self.buckets[0].master.fill_(float("inf"))
            self.buckets[0].shard.copy_(self.buckets[0].master)

    monkeypatch.setattr(ZeroAdamW, "update", blow_up_at_step_7)
    assert train.main([str(config), "training.max_skipped_steps=10"]) == 0  # steps 8 to 12 skipped
    assert checkpoint.checkpoint_steps(exp) == [12, 9, 6]  # keep 2, and the newest finite one
    finite = {s: json.loads((exp / "checkpoints" / str(s) / "trainer.json").read_text())["weights_finite"]
              for s in (12, 9, 6)}
    assert finite == {12: False, 9: False, 6: True}
    monkeypatch.undo()
    capsys.readouterr()
    assert train.main([str(config), "training.train_iters=14"]) == 0
    err = capsys.readouterr().err
    assert "checkpoints/12 holds non-finite weights" in err and "checkpoints/9 holds non-finite weights" in err
    assert sorted(metrics(exp, "loss")) == list(range(1, 15)) and checkpoint.checkpoint_steps(exp) == [14, 12]


def test_a_bad_step_is_skipped_and_training_goes_on(setup, monkeypatch):
    config, exp = setup
    import model

    real, calls = model.Llama.forward, [0]

    def nan_on_step_5(self, tokens, labels=None, documents=None):  # 2 micro-batches a step: step 5's 2nd
        loss = real(self, tokens, labels, documents)
        if labels is not None and torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 10:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(model.Llama, "forward", nan_on_step_5)
    assert train.main([str(config), "training.logs.interval=3"]) == 0
    lines = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line.get("skipped") == "non-finite loss"] == [5]
    loss = metrics(exp, "loss")
    assert sorted(loss) == [1, 2, 3, 6, 9, 12] and all(v == v for v in loss.values())  # no NaN in any average


def test_two_ranks_skip_the_same_step(setup, tmp_path):
    """Rank 1's loss is NaN on step 3; rank 0's is finite: both skip it, and the weights stay equal."""
    config, exp = setup
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import model, train
real, calls = model.Llama.forward, [0]
def forward(self, tokens, labels=None, documents=None):
    loss = real(self, tokens, labels, documents)
    if labels is not None and model.torch.is_grad_enabled() and os.environ["RANK"] == "1":
        calls[0] += 1  # one micro-batch a step on each of the 2 ranks
        if calls[0] == 3:
            return loss * float("nan")
    return loss
model.Llama.forward = forward
sys.exit(train.main(sys.argv[1:]))
""")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(config), "training.train_iters=6", "training.test_iters=0", f"run.experiment_dir={exp}"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line.get("skipped") == "non-finite loss"] == [3]
    assert sorted(metrics(exp, "loss")) == [1, 2, 4, 5, 6]


def test_non_finite_starting_weights_are_refused(setup, tmp_path, capsys):
    config, exp = setup
    assert train.main([str(config), "training.train_iters=3", "training.export.interval=3"]) == 0
    folder = exp / "export" / "llama" / "3"
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    from safetensors.torch import save_file

    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    other = tmp_path / "other"
    assert train.main([str(config), f"pretrained.path={folder}", f"run.experiment_dir={other}"]) == 2
    err = capsys.readouterr().err
    assert "starting weights hold NaN or infinite values" in err and str(folder) in err and not other.exists()


def test_rotation_keeps_the_newest_finite_checkpoint(tmp_path):
    for step, finite in ((3, True), (6, True), (9, False), (12, False)):
        folder = tmp_path / "checkpoints" / str(step)
        folder.mkdir(parents=True)
        (folder / "trainer.json").write_text(json.dumps({"weights_finite": finite, "sequence_length": 32}))
    checkpoint.rotate(tmp_path, keep=2)
    assert checkpoint.checkpoint_steps(tmp_path) == [12, 9, 6]
    checkpoint.rotate(tmp_path, keep=1)
    assert checkpoint.checkpoint_steps(tmp_path) == [12, 6]


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints: the run warns, falls back to the one before, and ends as if nothing happened


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:40] = b"{not json at all, just garbage}!"
    path.write_bytes(bytes(data))


def flip_64_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start : start + 64] = bytes(b ^ 0xFF for b in data[start : start + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file, damage", [
    ("optimizer-00000-of-00001.safetensors", truncate),
    ("optimizer-00000-of-00001.safetensors", garbage_header),
    ("optimizer-00000-of-00001.safetensors", flip_64_bytes),
    ("trainer.json", truncate),
    ("model_config.json", Path.unlink),
    ("manifest.json", Path.unlink),
])
def test_damaged_newest_checkpoint_falls_back_to_the_one_before(setup, monkeypatch, capsys, file, damage):
    config, exp = setup
    expected = reference(config, exp)
    crash_at(monkeypatch, 10)
    with pytest.raises(Killed):
        train.main([str(config)])
    damage(exp / "checkpoints" / "9" / file)
    monkeypatch.undo()
    capsys.readouterr()
    assert train.main([str(config)]) == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint {exp / 'checkpoints' / '9'} can't be used" in err and "trying an older one" in err
    assert (file in err or "manifest" in err) and "Traceback" not in err
    assert_same_run(exp, expected)


def test_resume_needs_no_pretrained_folder(setup, tmp_path, monkeypatch):
    config, exp = setup
    assert train.main([str(config), "training.train_iters=3", "training.export.interval=3"]) == 0
    pretrained = tmp_path / "pretrained"
    (exp / "export" / "llama" / "3").rename(pretrained)
    other = tmp_path / "other"
    args = [str(config), f"pretrained.path={pretrained}", f"run.experiment_dir={other}"]
    crash_at(monkeypatch, 5)
    with pytest.raises(Killed):
        train.main(args)
    monkeypatch.undo()
    subprocess.run(["rm", "-rf", str(pretrained)], check=True)
    assert train.main(args) == 0 and sorted(metrics(other, "loss")) == list(range(1, 13))


def test_keep_holds_after_a_kill_during_the_final_checkpoint(setup, monkeypatch):
    config, exp = setup

    real = checkpoint.rotate

    def killed(exp, keep):  # killed right after the final checkpoint appeared
        if checkpoint.checkpoint_steps(exp)[:1] == [12]:
            raise Killed()
        real(exp, keep)

    monkeypatch.setattr(checkpoint, "rotate", killed)
    with pytest.raises(Killed):
        train.main([str(config)])
    assert checkpoint.checkpoint_steps(exp) == [12, 9, 6]
    monkeypatch.undo()
    assert train.main([str(config)]) == 0
    assert checkpoint.checkpoint_steps(exp) == [12, 9]  # keep: 2


# ---------------------------------------------------------------------------------------------
# Disk and file-system faults


def test_full_disk_during_a_checkpoint_is_a_clear_error(setup, monkeypatch, capsys):
    config, exp = setup
    real = checkpoint.write_file

    def full(path, chunks):
        if ".tmp-9" in str(path) and "model" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, chunks)

    monkeypatch.setattr(checkpoint, "write_file", full)
    assert train.main([str(config)]) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err and "Traceback" not in err
    assert checkpoint.checkpoint_steps(exp) == [6, 3] and not (exp / "checkpoints" / ".tmp-9").exists()
    assert checkpoint.damage(exp / "checkpoints" / "6", 0, 1) is None  # the previous one is intact
    monkeypatch.undo()
    assert train.main([str(config)]) == 0 and sorted(metrics(exp, "loss")) == list(range(1, 13))


def test_full_disk_during_an_export_is_a_clear_error(setup, monkeypatch, capsys):
    config, exp = setup

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "export_llama", full)
    assert train.main([str(config), "training.export.interval=4"]) == 2
    err = capsys.readouterr().err
    assert "could not write the export of step 4" in err and "No space left" in err and "Traceback" not in err
    assert checkpoint.checkpoint_steps(exp) == [3]


def test_half_written_metrics_line_is_dropped_and_nothing_else(setup, monkeypatch, capsys):
    config, exp = setup
    expected = reference(config, exp, "training.logs.interval=5")
    crash_at(monkeypatch, 11)
    with pytest.raises(Killed):
        train.main([str(config), "training.logs.interval=5"])
    with (exp / "metrics.jsonl").open("a") as f:
        f.write('{"step": 10, "loss": 1.2')  # the disk filled up mid-line
    monkeypatch.undo()
    assert train.main([str(config), "training.logs.interval=5"]) == 0
    assert "is not a whole record" in capsys.readouterr().err
    assert_same_run(exp, expected)


@pytest.mark.parametrize("where", ["a file", "under a file", "read-only"])
def test_unusable_experiment_dir_is_a_clear_error(setup, tmp_path, monkeypatch, capsys, where):
    config, _ = setup
    (tmp_path / "file").write_text("not a folder")
    exp = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "exp", "read-only": tmp_path / "ro"}[where]
    if where == "read-only":  # a read-only mount needs privileges a test can't count on: access() says no
        real = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == tmp_path else real(path, mode))
    assert train.main([str(config), f"run.experiment_dir={exp}"]) == 2
    err = capsys.readouterr().err
    assert "run.experiment_dir" in err and ("is a file" if where != "read-only" else "not writable") in err


# ---------------------------------------------------------------------------------------------
# Exact logs across resumes, whatever the two intervals


def test_logs_are_exact_when_the_log_interval_is_not_a_multiple_of_the_checkpoint_interval(setup, monkeypatch):
    config, exp = setup
    expected = reference(config, exp, "training.logs.interval=5")
    crash_at(monkeypatch, 8)  # the last checkpoint is step 6, inside the interval 6..10
    with pytest.raises(Killed):
        train.main([str(config), "training.logs.interval=5"])
    monkeypatch.undo()
    assert train.main([str(config), "training.logs.interval=5"]) == 0
    assert_same_run(exp, expected)


def test_logs_are_exact_on_two_ranks_after_a_resume_inside_a_log_interval(setup, tmp_path):
    """Each rank keeps its own loss sum of the interval in the checkpoint: the resume from step 6 logs step 10 as
    an uninterrupted run does (rank 0's sum, restored on every rank, once logged another loss there)."""
    config, exp = setup
    expected = reference(config, exp, "training.logs.interval=5", launch=lambda *args: torchrun(2, *args))
    script = tmp_path / "crash_at_8.py"  # both ranks stop at step 8, the last checkpoint being step 6
    script.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import train
real = train.lr_at
def crash(c, step, iters):
    if step == 8:
        sys.exit(9)
    return real(c, step, iters)
train.lr_at = crash
sys.exit(train.main(sys.argv[1:]))
""")
    torchrun(2, config, "training.logs.interval=5", script=str(script), returncode=9)
    assert checkpoint.checkpoint_steps(exp) == [6, 3] and max(metrics(exp, "loss")) == 5
    torchrun(2, config, "training.logs.interval=5")
    assert 10 in metrics(exp, "loss")
    assert_same_run(exp, expected)


# ---------------------------------------------------------------------------------------------
# Signals and kill -9, on real processes


def start(config: Path, *overrides: str, command=("train.py",), **popen) -> subprocess.Popen:
    """train.py (or `command`) in a session of its own, so that finish() can end it and its children."""
    return subprocess.Popen([sys.executable, *command, str(config), *overrides], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            start_new_session=True, **popen)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """Its output once it has ended; past the timeout every process of its session is killed first."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{out[-2000:]}\n{err[-2000:]}") from None


def wait_for_step(exp: Path, step: int, process: subprocess.Popen) -> None:
    """Until the run has logged `step`, or has ended."""
    path, deadline = exp / "metrics.jsonl", time.time() + 120
    while process.poll() is None:
        if path.exists() and any(f'"step": {step},' in line for line in path.read_text().splitlines()):
            return
        assert time.time() < deadline, f"step {step} never logged"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_with_a_checkpoint_and_the_resume_is_exact(setup, signum):
    config, exp = setup
    expected = reference(config, exp)
    at = random.Random(signum).randint(1, 10)
    process = start(config)
    wait_for_step(exp, at, process)
    process.send_signal(signum)
    out, err = finish(process)
    assert process.returncode == 0, err
    stopped = int(out.split("stopped at step ")[1].split(";")[0])
    assert stopped >= at and f"stopped at step {stopped}; run the same command to resume" in out
    assert checkpoint.checkpoint_steps(exp)[0] == stopped and "Traceback" not in err
    assert train.main([str(config)]) == 0
    assert_same_run(exp, expected)


def test_a_second_signal_ends_the_run_at_once(setup, tmp_path):
    """The first signal starts the stopping checkpoint, written slowly here; the second ends the process
    in the middle of it. The checkpoint before is whole, and the run resumes from it."""
    config, exp = setup
    script = tmp_path / "slow_checkpoints.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import checkpoint, train
real = checkpoint.write_file
def slow(path, chunks):
    time.sleep(0.5)
    return real(path, chunks)
checkpoint.write_file = slow
sys.exit(train.main(sys.argv[1:]))
""")
    process = start(config, command=(str(script),))
    wait_for_step(exp, 4, process)
    process.send_signal(signal.SIGTERM)
    deadline = time.time() + 60
    while not list((exp / "checkpoints").glob(".tmp-*")) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.6)  # signals closer than half a second count as one (a launcher relaying it)
    process.send_signal(signal.SIGTERM)
    out, _ = finish(process)
    assert process.returncode == -signal.SIGTERM and "stopped at step" not in out
    newest = exp / "checkpoints" / str(checkpoint.checkpoint_steps(exp)[0])
    assert checkpoint.checkpoint_steps(exp)[0] in (3, 6) and checkpoint.damage(newest, 0, 1) is None
    assert train.main([str(config)]) == 0 and sorted(metrics(exp, "loss")) == list(range(1, 13))


def test_two_ranks_stop_together_on_a_signal_to_one_of_them(setup, tmp_path):
    config, exp = setup
    common = ["training.test_iters=0", "model.multi_stage.zero_stage=2"]
    torchrun(2, config, *common, f"run.experiment_dir={tmp_path / 'reference'}")
    process = start(config, *common, command=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                              "train.py"))
    wait_for_step(exp, random.Random(2).randint(1, 6), process)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in workers:  # find rank 1 among the workers torchrun started
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks.update({e.decode()[5:]: int(pid) for e in environ if e.startswith(b"RANK=")})
    os.kill(ranks["1"], signal.SIGTERM)
    out, err = finish(process)
    assert process.returncode == 0 and "stopped at step" in out, out[-3000:] + err[-3000:]
    torchrun(2, config, *common)
    for key in ("loss", "grad_norm", "lr", "val_loss"):
        assert metrics(exp, key) == metrics(tmp_path / "reference", key), key


def test_kill_9_at_random_moments_never_loses_a_bit(setup):
    """Five kill -9 at random moments (inside checkpoint writes and rotations too), then a run to the end:
    the same metrics and weights as an uninterrupted run."""
    config, exp = setup
    overrides = ["training.checkpoint.interval=2", "training.export.interval=5"]
    expected = reference(config, exp, *overrides)
    rng = random.Random(0)
    for _ in range(5):
        process = start(config, *overrides)
        wait_for_step(exp, checkpoint.checkpoint_steps(exp)[0] + 1 if checkpoint.checkpoint_steps(exp) else 1, process)
        time.sleep(rng.uniform(0, 0.5))
        with contextlib.suppress(ProcessLookupError):  # it may have finished already
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert train.main([str(config), *overrides]) == 0
    assert_same_run(exp, expected)


def test_signals_relayed_by_a_launcher_count_as_one(monkeypatch):
    killed = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(sig))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = train.Stop()
        stop.handle(signal.SIGINT, None)  # Ctrl-C reaches torchrun and the workers;
        stop.handle(signal.SIGTERM, None)  # torchrun relays it as SIGTERM a moment later
        assert stop.requested is not None and killed == []
        stop.requested -= 1  # a second later, another one: the process ends at once
        stop.handle(signal.SIGTERM, None)
        assert killed == [signal.SIGTERM]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
