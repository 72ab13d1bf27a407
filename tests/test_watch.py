"""What a run shows while it goes: timed log lines, Weights & Biases offline, the picture of the loss,
--help, and the surprises caught before a run starts (a pretrained folder that does not fit, YAML values
over config.json, a changed schedule, ranks that don't share the experiment folder)."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import export
import plot
import schema
import train
from test_faults import crash_at
from test_train import ROOT, Killed, metrics, setup  # noqa: F401 (setup is a fixture)


def lines(exp) -> list[dict]:
    return [json.loads(line) for line in (exp / "metrics.jsonl").read_text().splitlines()]


def killed_at_step_8(config, monkeypatch) -> None:
    """A run killed at step 8, which left its checkpoint of step 6."""
    crash_at(monkeypatch, 8)
    with pytest.raises(Killed):
        train.main([str(config)])
    monkeypatch.undo()


def test_log_lines_carry_time_tokens_and_eta_and_the_first_steps_log_at_once(setup, capsys):
    config, exp = setup
    assert train.main([str(config), "training.logs.interval=5", "training.train_iters=10"]) == 0
    out = capsys.readouterr().out
    steps = [line["step"] for line in lines(exp) if "loss" in line]
    assert steps == [1, 2, 4, 5, 10]  # 1, 2, 4 before the first interval
    for line in lines(exp):
        assert line["time"] > 1.7e9
    last = [line for line in lines(exp) if "loss" in line][-1]
    assert last["tokens"] == 10 * 4 * 32 and 0 < last["elapsed_s"] < 600
    first = next(line for line in out.splitlines() if line.startswith("step 1/10"))
    for part in ("M tokens", "s/step", "elapsed 0:00:", "ETA 0:"):
        assert part in first, first


def test_wandb_offline_logs_the_metrics_and_a_resume_continues_the_same_run(setup, monkeypatch):
    pytest.importorskip("wandb")  # in requirements-test.txt
    config, exp = setup
    args = [str(config), "training.wandb.entity_name=someone", "training.wandb.project_name=tests"]
    offline = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    crash_at(monkeypatch, 8)
    for name, value in offline.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(Killed):
        train.main(args)
    run_id = (exp / "wandb_run_id").read_text()
    monkeypatch.undo()
    for name, value in offline.items():
        monkeypatch.setenv(name, value)
    assert train.main(args) == 0
    assert (exp / "wandb_run_id").read_text() == run_id
    runs = sorted((exp / "wandb").glob("offline-run-*"))
    # The first run and its resume log under the same W&B id (one folder, or two when a second has passed).
    assert runs and all(f"-{run_id}" in run.name for run in runs)  # W&B adds -1 to a folder name taken
    history = b"".join(p.read_bytes() for run in runs for p in run.glob("*.wandb"))
    assert b"grad_norm" in history and b"val_loss" in history and b"tokens_per_s" in history


def test_wandb_missing_stops_at_once(setup, monkeypatch, capsys):
    config, exp = setup
    real = schema.importlib.util.find_spec
    monkeypatch.setattr(schema.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    assert train.main([str(config), "training.wandb.entity_name=someone"]) == 2
    assert "the wandb package is not installed" in capsys.readouterr().err and not exp.exists()


def test_plot_draws_the_curves_with_resumes_and_skipped_steps(setup, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")  # in requirements-test.txt
    config, exp = setup
    killed_at_step_8(config, monkeypatch)
    assert train.main([str(config)]) == 0
    with (exp / "metrics.jsonl").open("a") as f:  # as a run that skipped a step logs it
        f.write(json.dumps({"step": 12, "skipped": "non-finite loss"}) + "\n")
    assert any(line.get("resumed") for line in lines(exp))
    out = tmp_path / "curves.png"
    assert plot.main([str(exp), "--output", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert plot.main([str(tmp_path / "nowhere")]) == 2


@pytest.mark.parametrize("script", ["train.py", "prepare.py", "export.py", "plot.py"])
def test_help_exits_0(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and "usage:" in out.stdout
    if script == "train.py":
        assert "docs/schema.md" in out.stdout and "model.base_model" in out.stdout and "section.key=value" in out.stdout


def test_dry_run_catches_a_pretrained_folder_that_does_not_fit(setup, tmp_path, capsys):
    config, exp = setup
    assert train.main([str(config), "training.train_iters=3", "training.export.interval=3"]) == 0
    folder = exp / "export" / "llama" / "3"
    capsys.readouterr()
    common = [str(config), f"pretrained.path={folder}", f"run.experiment_dir={tmp_path / 'new'}", "--dry-run"]
    assert train.main(common) == 0
    # The YAML changes the MLP width over config.json's: the weights no longer fit, and the dry run says so.
    assert train.main(common + ["model.base_model.transformer.ffn_hidden_size=48"]) == 2
    captured = capsys.readouterr()
    assert "model.base_model.transformer.ffn_hidden_size: 48 from" in captured.out  # the override, on one line
    assert "ffn_hidden_size" in captured.err and "Traceback" not in captured.err
    weights = load_file(folder / "model.safetensors")  # and a folder whose weights lost a tensor
    del weights["model.norm.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert train.main(common) == 2 and "norm.weight" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_a_resume_with_a_changed_schedule_says_what_moved(setup, monkeypatch, capsys):
    config, exp = setup
    killed_at_step_8(config, monkeypatch)
    capsys.readouterr()
    assert train.main([str(config), "training.train_iters=20", "optimizer.learning_rate.base=0.02"]) == 0
    out = capsys.readouterr().out
    assert "changed since the checkpoint: training.train_iters 12 -> 20; " \
           "optimizer.learning_rate.base 0.01 -> 0.02. The learning rate of step 7 is" in out
    changed = [line for line in lines(exp) if "changed" in line]
    assert [(c["step"], c["changed"]) for c in changed] == [
        (6, {"training.train_iters": [12, 20], "optimizer.learning_rate.base": [0.01, 0.02]})]


def test_a_resume_with_another_batch_or_blend_says_so_and_plot_counts_the_tokens_read(setup, monkeypatch, capsys):
    pytest.importorskip("matplotlib")  # in requirements-test.txt
    config, exp = setup
    killed_at_step_8(config, monkeypatch)
    dataset = config.parent / "data" / "dataset.json"  # the same path, now a blend of the file with itself
    dataset.write_text(json.dumps({"datasets": [{"prefix": "hand", "weight": 1.0}, {"prefix": "hand", "weight": 3}]}))
    capsys.readouterr()
    assert train.main([str(config), "batch.batch_size=8"]) == 0
    out = capsys.readouterr().out
    assert "changed since the checkpoint: batch.batch_size 4 -> 8; the datasets read or their weights" in out
    changed = [line for line in lines(exp) if "changed" in line]
    assert len(changed) == 1 and changed[0]["changed"]["batch.batch_size"] == [4, 8]
    assert [share for *_, share in changed[0]["changed"]["blend"][1]] == [0.25, 0.75]
    train_lines = [line for line in lines(exp) if "loss" in line]
    assert [line["tokens"] for line in train_lines] == [s * 4 * 32 for s in range(1, 7)] + [
        6 * 4 * 32 + s * 8 * 32 for s in range(1, 7)]  # 6 steps of 4 samples, then 6 of 8
    x = plot.token_axis(train_lines)
    assert x({"step": 9, "val_loss": 1.0}) == (6 * 4 + 3 * 8) * 32 / 1e6  # between training lines, by their tokens
    assert x({"step": 6, "resumed": True}) == 6 * 4 * 32 / 1e6
    # a finished run started again resumes nothing and marks no resume
    assert train.main([str(config), "batch.batch_size=8"]) == 0
    assert [line.get("resumed") for line in lines(exp)].count(True) == 1


def test_ranks_that_do_not_share_the_experiment_folder_are_refused(setup, tmp_path):
    """Two ranks on one machine, each told a different folder: what two nodes without a shared file
    system see. Nothing is left behind."""
    config, _ = setup
    script = tmp_path / "own_folder_per_rank.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train
sys.exit(train.main(sys.argv[1:] + [f"run.experiment_dir={tmp_path}/rank{{os.environ['RANK']}}"]))
""")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               str(config), "training.train_iters=2"]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         timeout=300)
    assert out.returncode != 0
    assert "must be on a file system that all nodes share" in out.stderr
    assert not (tmp_path / "rank0").exists()  # rank 0 created it for the check, and removed it


def test_export_finds_the_tokenizer_and_the_newest_checkpoint(tmp_path):
    data = tmp_path / "data"
    subprocess.run([sys.executable, "prepare.py", "--demo", "--output", str(data)], cwd=ROOT, check=True,
                   capture_output=True)
    exp = tmp_path / "exp"
    assert train.main([str(ROOT / "config" / "tiny.yaml"), f"data.path={data / 'fast_llm_dataset.json'}",
                       f"run.experiment_dir={exp}", "training.train_iters=4", "training.checkpoint.interval=2",
                       "training.validation.interval=null", "training.test_iters=0", "training.export.interval=null",
                       "model.base_model.transformer.num_layers=1"]) == 0
    out = export.export_checkpoint(exp, tmp_path / "hf")  # the folder means its newest checkpoint, 4
    assert (out / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    exported = load_file(out / "model.safetensors")
    saved = load_file(exp / "checkpoints" / "4" / "model.safetensors")
    assert all((exported["model." + k if k != "lm_head.weight" else k] == v).all() for k, v in saved.items())
