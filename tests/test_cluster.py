"""A shared cluster: one run per experiment folder (its lock), ranks from Slurm's variables, graceful stops that
launchers see as success, and the user errors that are one line, exit 2 and write nothing."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

import checkpoint
import export
import train
from test_faults import finish, start, wait_for_step
from test_train import ROOT, metrics, setup  # noqa: F401 (setup is a fixture)


def refuse_writes_under(folder, monkeypatch):
    """As a folder the user may not write to behaves (the tests may run as root, whom permissions don't bind)."""
    real = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.is_relative_to(folder):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    folder.mkdir()
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if pathlib.Path(p) == folder else real_access(p, mode))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_second_run_in_the_same_folder_is_refused_naming_the_first(setup, capsys):
    config, exp = setup
    first = start(config, "training.train_iters=400", "training.checkpoint.interval=1000")
    try:
        wait_for_step(exp, 1, first)
        before = (exp / "metrics.jsonl").read_text()
        assert train.main([str(config)]) == 2
        err = one_error_line(capsys)
        assert f"is in use by another run (host {socket.gethostname()}, pid {first.pid}, since " in err
        assert (exp / "metrics.jsonl").read_text().startswith(before)  # its lines untouched, none of ours
        assert train.main([str(config), "--dry-run"]) == 2 and "in use by another run" in one_error_line(capsys)
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = finish(first)
    assert first.returncode == 0 and "stopped at step" in out, err[-2000:]
    assert not (exp / "lock").exists()  # released on the way out
    assert train.main([str(config)]) == 0 and sorted(metrics(exp, "loss")) == list(range(1, 13))


@pytest.mark.parametrize("holder", ["dead process here", "other host, untouched", "half written"])
def test_a_lock_whose_run_is_gone_is_taken_over(setup, capsys, holder):
    config, exp = setup
    exp.mkdir()
    (exp / "metrics.jsonl").write_text("")
    lock = exp / "lock"
    if holder == "half written":
        lock.write_text('{"host": ')
    else:
        host = socket.gethostname() if holder == "dead process here" else "node-elsewhere"
        lock.write_text(json.dumps({"host": host, "pid": dead_pid() if host != "node-elsewhere" else 1, "since": "x"}))
    if holder == "other host, untouched":
        old = time.time() - checkpoint.STALE_S - 10
        os.utime(lock, (old, old))
    (exp / "checkpoints" / ".tmp-7").mkdir(parents=True)  # an interrupted checkpoint write
    (exp / "checkpoints" / ".tmp-7" / "model.safetensors").write_bytes(b"x" * 1000)
    assert train.main([str(config), "training.train_iters=3"]) == 0
    assert "the run that took it is gone; taking it over" in capsys.readouterr().err
    assert not lock.exists() and sorted(p.name for p in (exp / "checkpoints").iterdir()) == ["3"]


def test_a_lock_another_host_keeps_fresh_is_respected(setup, capsys):
    config, exp = setup
    exp.mkdir()
    (exp / "lock").write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "since": "2026-12-07 10:00:00"}))
    assert train.main([str(config)]) == 2
    assert "in use by another run (host node-elsewhere, pid 1, since 2026-12-07 10:00:00)" in one_error_line(capsys)
    assert sorted(p.name for p in exp.iterdir()) == ["lock"]


def slurm_tasks(config, *overrides, tasks=2, **popen):
    """train.py as `srun --ntasks=2` starts it: one process per task, told its place by Slurm's variables."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keep = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return [subprocess.Popen([sys.executable, "train.py", str(config), *overrides], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                             env=dict(keep, OMP_NUM_THREADS="1", SLURM_STEP_NUM_TASKS=str(tasks), SLURM_PROCID=str(i),
                                      SLURM_LOCALID=str(i), SLURM_NTASKS="16", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(port)), **popen)
            for i in range(tasks)]


def test_srun_tasks_train_as_ranks_and_a_preemption_signal_exits_0(setup, tmp_path):
    """Slurm signals every task of a step at once; each finishes its step, one checkpoint is written, all exit 0;
    the requeued job's tasks resume it to the same numbers as torchrun's 2 ranks uninterrupted."""
    config, exp = setup
    common = ["training.test_iters=0", "model.multi_stage.zero_stage=2"]
    tasks = slurm_tasks(config, *common)
    wait_for_step(exp, 4, tasks[0])
    for task in tasks:
        task.send_signal(signal.SIGTERM)
    outs = [finish(task) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], [err[-2000:] for _, err in outs]
    assert "stopped at step" in outs[0][0] and "2 rank(s)" in outs[0][0]
    step = checkpoint.checkpoint_steps(exp)[0]
    assert 4 <= step < 12 and not (exp / "lock").exists()
    tasks = slurm_tasks(config, *common)
    assert [finish(task) and task.returncode for task in tasks] == [0, 0]
    reference = tmp_path / "reference"
    train_two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    subprocess.run([*train_two, str(config), *common, f"run.experiment_dir={reference}"], cwd=ROOT, check=True,
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert metrics(exp, "loss") == metrics(reference, "loss") and sorted(metrics(exp, "loss")) == list(range(1, 13))


def test_srun_tasks_without_a_master_address_get_one_line(setup):
    config, exp = setup
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    out = subprocess.run([sys.executable, "train.py", str(config)], cwd=ROOT, capture_output=True, text=True,
                         env=dict(env, SLURM_STEP_NUM_TASKS="2", SLURM_PROCID="0", SLURM_LOCALID="0"))
    assert out.returncode == 2 and "export MASTER_ADDR=$(scontrol" in out.stderr and out.stderr.count("\n") == 1
    assert not exp.exists()


def test_wandb_that_will_not_start_is_one_line_and_writes_nothing(setup, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")  # in requirements-test.txt

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", refuse)
    config, exp = setup
    assert train.main([str(config), "training.wandb.entity_name=someone"]) == 2
    err = one_error_line(capsys)
    assert "training.wandb: Weights & Biases would not start (api_key not configured" in err and "wandb login" in err
    assert not exp.exists()  # no config.yaml, no wandb_run_id, no lock


def test_resuming_another_architecture_names_the_keys_and_dry_run_finds_it_first(setup, capsys):
    config, exp = setup
    assert train.main([str(config), "training.train_iters=3"]) == 0
    before = sorted(p.name for p in exp.rglob("*"))
    for args in ([], ["--dry-run"]):
        assert train.main([str(config), "model.base_model.transformer.num_layers=4", *args]) == 2
        err = one_error_line(capsys)
        assert "transformer.num_layers: 2 there, 4 here" in err and len(err) < 400, err
    assert sorted(p.name for p in exp.rglob("*")) == before


def test_dry_run_checks_the_experiment_folder(setup, capsys, monkeypatch):
    config, exp = setup
    refuse_writes_under(exp, monkeypatch)
    assert train.main([str(config), "--dry-run"]) == 2
    assert "is not writable" in one_error_line(capsys)


def test_a_config_yaml_of_the_users_own_is_not_overwritten(setup, capsys):
    config, exp = setup
    exp.mkdir()
    (exp / "config.yaml").write_text("mine: true\n")
    assert train.main([str(config)]) == 2
    assert "holds a config.yaml that no run of this project wrote" in one_error_line(capsys)
    assert (exp / "config.yaml").read_text() == "mine: true\n" and sorted(p.name for p in exp.iterdir()) == [
        "config.yaml"]


@pytest.mark.parametrize("value", ["-4", "0"])
def test_a_batch_size_below_1_suggests_no_value(setup, capsys, value):
    config, _ = setup
    assert train.main([str(config), f"batch.batch_size={value}"]) == 2
    err = capsys.readouterr().err  # the config's problems, one a line
    assert f"batch.batch_size is required and must be at least 1, got {value}" in err and "fit" not in err, err


def test_a_data_path_naming_a_folder_names_the_file_in_it(setup, capsys):
    config, exp = setup
    assert train.main([str(config), f"data.path={config.parent / 'data'}"]) == 2
    err = one_error_line(capsys)
    assert f"{config.parent / 'data'} is a folder; name the dataset file in it" in err and not exp.exists()


def test_export_into_an_unwritable_folder_is_one_line(setup, tmp_path, monkeypatch, capsys):
    config, exp = setup
    assert train.main([str(config), "training.train_iters=3"]) == 0
    capsys.readouterr()
    refuse_writes_under(tmp_path / "locked", monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        export.main([str(exp), str(tmp_path / "locked" / "hf")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("export.py: error: ") and err.count("\n") == 1, err
    assert "Permission denied" in err and not list((tmp_path / "locked").iterdir())


def test_checkpoints_are_readable_as_the_umask_says(setup):
    config, exp = setup
    assert train.main([str(config), "training.train_iters=3"]) == 0
    files = [p for p in (exp / "checkpoints" / "3").iterdir()]
    assert {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~export.UMASK}
    saved = yaml.safe_load((exp / "config.yaml").read_text())
    assert saved["run"]["experiment_dir"] == str(exp)


def test_prepare_into_an_unwritable_folder_and_ctrl_c_are_one_line(tmp_path, monkeypatch, capsys):
    import prepare

    (tmp_path / "a.txt").write_text("some text to read")
    args = [sys.executable, "prepare.py", "--input", str(tmp_path / "a.txt"), "--vocab-size", "300", "--workers", "1"]
    refuse_writes_under(tmp_path / "locked", monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        prepare.main([*args[2:], "--output", str(tmp_path / "locked" / "data")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Permission denied" in err and not list((tmp_path / "locked").iterdir())
    monkeypatch.undo()
    # Ctrl-C while tokenizing: exit 130, one line, nothing of the dataset left
    assert subprocess.run([*args, "--output", str(tmp_path / "tok")], cwd=ROOT, capture_output=True).returncode == 0
    (tmp_path / "big.jsonl").write_text((json.dumps({"text": "a line of text " * 20}) + "\n") * 400_000)
    process = subprocess.Popen([*args[:3], str(tmp_path / "big.jsonl"), "--tokenizer", str(tmp_path / "tok" /
                                "tokenizer.json"), "--workers", "1", "--output", str(tmp_path / "out")], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "out" / ".prepare-staging").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [1, 2])
def test_a_fallback_never_deletes_the_checkpoint_it_resumes_from(setup, capsys, keep):
    """Checkpoints 9 and 12, a flipped bit in 12's optimizer shard: the run falls back to 9 and keeps it, whatever
    training.checkpoint.keep says, until it has written a newer good one."""
    config, exp = setup
    assert train.main([str(config)]) == 0
    expected = metrics(exp, "loss")
    shard = exp / "checkpoints" / "12" / "optimizer-00000-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    (exp / "metrics.jsonl").write_text("".join(line + "\n" for line in (exp / "metrics.jsonl").read_text()
                                               .splitlines() if json.loads(line).get("step", 0) <= 9))
    assert train.main([str(config), f"training.checkpoint.keep={keep}"]) == 0
    assert "can't be used" in capsys.readouterr().err
    assert metrics(exp, "loss") == expected
    assert checkpoint.checkpoint_steps(exp)[:1] == [12] and checkpoint.damage(exp / "checkpoints" / "12", 0, 1) is None


@pytest.mark.parametrize("text", [
    "config: &c {type: blended, datasets: [*c], weights: [1]}\nmetadata: {}\n",
    "config: &c {type: slice, dataset: *c}\nmetadata: {}\n",
    "config: " + "{type: blended, weights: [1], datasets: [" * 3000 + "{type: memmap, path: x}" + "]}" * 3000 + "\n"])
def test_a_dataset_yaml_that_holds_itself_is_refused_naming_the_file(tmp_path, text):
    from data import DataError, read_datasets

    (tmp_path / "d.yaml").write_text(text)
    with pytest.raises(DataError, match=f"{tmp_path / 'd.yaml'}: .*(holds itself|nested too deep)"):
        read_datasets(tmp_path / "d.yaml")


def test_a_relayed_signal_just_after_the_loop_still_counts_as_one():
    """torchrun or srun relays the signal 0.1 s after the original: the stop checkpoint may be written by then and
    the handlers about to be restored; the copy must not kill the process (exit 143)."""
    stop = train.Stop()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested is not None
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
    finally:
        stop.restore()  # waits out the half second, so the copy lands in our handler
    assert signal.getsignal(signal.SIGTERM) == stop.previous[signal.SIGTERM]
