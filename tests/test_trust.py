"""Checkpoints and exports you can trust, on real damaged files: a damaged checkpoint is set aside and never
counts toward `keep`, nothing is loaded that the manifest does not vouch for, exports take only usable weights,
and every write that fails is one line naming the file, with nothing half-written left behind."""
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import checkpoint
import export
import train
from test_faults import KEYS, assert_same_run, finish, flip_64_bytes, start
from test_train import ROOT, metrics, setup  # noqa: F401 (setup is a fixture)


def checkpoints(exp: Path) -> list[str]:
    return sorted(p.name for p in (exp / "checkpoints").iterdir())


def logged_until(exp: Path, step: int) -> None:
    """metrics.jsonl as a run killed after `step`'s checkpoint left it."""
    lines = (exp / "metrics.jsonl").read_text().splitlines()
    (exp / "metrics.jsonl").write_text("".join(f"{l}\n" for l in lines if json.loads(l).get("step", 0) <= step))


def rewrite(folder: Path, name: str, tensors: dict) -> None:
    """Replace one file of a checkpoint and its manifest entry, as a run that wrote these tensors would have."""
    manifest, tensors = json.loads((folder / "manifest.json").read_text()), {k: v.clone() for k, v in tensors.items()}
    manifest[name] = checkpoint.write_file(folder / name, checkpoint.safetensors_chunks(tensors))  # not mapped
    (folder / "manifest.json").write_text(json.dumps(manifest))


def run_to_12_keeping_all(config: Path, exp: Path) -> tuple[dict, dict]:
    """A whole run's metrics and weights, and its checkpoints 3, 6, 9, 12 left in place."""
    assert train.main([str(config), "training.checkpoint.keep=10"]) == 0
    return ({k: metrics(exp, k) for k in KEYS}, load_file(exp / "checkpoints" / "12" / "model.safetensors"))


SHARD = "optimizer-00000-of-00001.safetensors"


@pytest.mark.parametrize("keep", [1, 2])
@pytest.mark.parametrize("damaged", [["12"], ["12", "9"]])
def test_damaged_checkpoints_are_set_aside_and_never_count_toward_keep(setup, capsys, keep, damaged):
    config, exp = setup
    expected = run_to_12_keeping_all(config, exp)
    for step in damaged:
        flip_64_bytes(exp / "checkpoints" / step / SHARD)
    logged_until(exp, 9 if damaged == ["12"] else 6)
    assert train.main([str(config), f"training.checkpoint.keep={keep}"]) == 0
    out, err = capsys.readouterr()
    assert_same_run(exp, expected)
    aside = [f"damaged-{step}" for step in damaged]
    assert checkpoints(exp) == sorted(aside + ["12", "9"][:keep])  # keep counts the good ones only
    for step in damaged:
        assert f"checkpoint {exp / 'checkpoints' / step} can't be used" in err
        assert f"set aside as {exp / 'checkpoints' / f'damaged-{step}'}" in out
        assert checkpoint.damage(exp / "checkpoints" / f"damaged-{step}")  # as it was, to look at


@pytest.mark.parametrize("case", ["entry removed", "empty manifest"])
def test_a_file_the_manifest_does_not_vouch_for_is_never_loaded(setup, capsys, case):
    config, exp = setup
    expected = run_to_12_keeping_all(config, exp)
    newest = exp / "checkpoints" / "12"
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest = {k: v for k, v in manifest.items() if k != SHARD} if case == "entry removed" else {}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    flip_64_bytes(newest / SHARD)  # what would be read, unchecked, if the manifest need not list it
    logged_until(exp, 9)
    assert train.main([str(config)]) == 0
    err = capsys.readouterr().err
    assert f"{newest / 'manifest.json'} does not vouch for" in err and SHARD in err and "trying an older one" in err
    assert_same_run(exp, expected)


def test_a_file_the_manifest_does_not_list_is_ignored(setup, capsys):
    config, exp = setup
    expected = run_to_12_keeping_all(config, exp)
    newest = exp / "checkpoints" / "9"
    (newest / "optimizer-00001-of-00002.safetensors").write_bytes(b"not a shard of this checkpoint")
    for step in ("12",):
        checkpoint.remove(exp / "checkpoints" / step)
    logged_until(exp, 9)
    assert train.main([str(config)]) == 0
    assert "can't be used" not in capsys.readouterr().err
    assert_same_run(exp, expected)


def test_non_finite_weights_found_at_load_fall_back(setup, capsys):
    """trainer.json says finite and every hash matches, but the float32 masters hold a NaN."""
    config, exp = setup
    expected = run_to_12_keeping_all(config, exp)
    newest = exp / "checkpoints" / "12"
    shard = load_file(newest / SHARD)
    name = next(k for k in shard if k.startswith("master/"))
    shard[name].view(-1)[0] = float("nan")
    rewrite(newest, SHARD, shard)
    assert checkpoint.damage(newest) is None
    logged_until(exp, 9)
    assert train.main([str(config)]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {newest} can't be used (its weights hold NaN or infinite values)" in err
    assert_same_run(exp, expected)


def test_a_dangling_symlink_as_the_newest_checkpoint_is_set_aside(setup, tmp_path, capsys):
    """The newest checkpoint moved to a disk that is not mounted: the run falls back, and writes step 12 again."""
    config, exp = setup
    expected = run_to_12_keeping_all(config, exp)
    checkpoint.remove(exp / "checkpoints" / "12")
    (exp / "checkpoints" / "12").symlink_to(tmp_path / "unmounted" / "12")
    logged_until(exp, 9)
    assert train.main([str(config)]) == 0
    assert f"checkpoint {exp / 'checkpoints' / '12'} can't be used" in capsys.readouterr().err
    assert_same_run(exp, expected)
    assert (exp / "checkpoints" / "damaged-12").is_symlink() and not (exp / "checkpoints" / "12").is_symlink()


def test_rotation_unlinks_a_symlinked_checkpoint_and_leaves_its_target(tmp_path):
    for step in (3, 6, 9):
        folder = tmp_path / ("elsewhere" if step == 3 else "checkpoints") / str(step)
        folder.mkdir(parents=True)
        (folder / "trainer.json").write_text(json.dumps({"weights_finite": True, "sequence_length": 32}))
    (tmp_path / "checkpoints" / "3").symlink_to(tmp_path / "elsewhere" / "3")
    checkpoint.rotate(tmp_path, keep=2)
    assert checkpoint.checkpoint_steps(tmp_path) == [9, 6] and (tmp_path / "elsewhere" / "3" / "trainer.json").exists()


def test_a_symlinked_metrics_file_stays_a_symlink(setup, tmp_path):
    config, exp = setup
    exp.mkdir()
    (tmp_path / "logs").mkdir()
    (exp / "metrics.jsonl").symlink_to(tmp_path / "logs" / "metrics.jsonl")
    assert train.main([str(config), "training.train_iters=4"]) == 0
    assert (exp / "metrics.jsonl").is_symlink() and sorted(metrics(exp, "loss")) == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Exports


def run_export(*args, limit=None) -> subprocess.CompletedProcess:
    """export.py in a process of its own; `limit`: the largest file it may write, as a nearly full disk allows."""
    return subprocess.run([sys.executable, str(ROOT / "export.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, preexec_fn=None if limit is None else lambda: file_size_limit(limit))


def file_size_limit(limit: int) -> None:
    """Writes past `limit` bytes fail with EFBIG, as writes to a full disk fail with ENOSPC (a real write error)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_export_refuses_a_damaged_checkpoint_and_takes_the_newest_usable_one(setup, tmp_path):
    config, exp = setup
    run_to_12_keeping_all(config, exp)
    flip_64_bytes(exp / "checkpoints" / "12" / "model.safetensors")
    result = run_export(exp / "checkpoints" / "12", tmp_path / "hf")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert str(exp / "checkpoints" / "12" / "model.safetensors") in result.stderr and not (tmp_path / "hf").exists()
    result = run_export(exp, tmp_path / "hf")
    assert result.returncode == 0, result.stderr
    assert f"warning: checkpoint {exp / 'checkpoints' / '12'} can't be used" in result.stderr
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    ours = load_file(exp / "checkpoints" / "9" / "model.safetensors")
    assert all(torch.equal(exported[export.hf_name(k)], v) for k, v in ours.items())


def test_export_refuses_non_finite_weights_the_manifest_vouches_for(setup, tmp_path):
    config, exp = setup
    assert train.main([str(config)]) == 0
    newest = exp / "checkpoints" / "12"
    weights = load_file(newest / "model.safetensors")
    next(iter(weights.values())).view(-1)[0] = float("inf")
    rewrite(newest, "model.safetensors", weights)
    result = run_export(newest, tmp_path / "hf")
    assert result.returncode == 2 and "its weights hold NaN or infinity" in result.stderr
    assert not (tmp_path / "hf").exists()


def test_a_full_disk_during_an_export_is_one_line_naming_the_file(setup, tmp_path):
    config, exp = setup
    assert train.main([str(config)]) == 0
    size = (exp / "checkpoints" / "12" / "model.safetensors").stat().st_size
    result = run_export(exp, tmp_path / "hf", limit=size // 2)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "File too large" in result.stderr and str(tmp_path / ".hf.partial" / "model.safetensors") in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["config.yaml", "data", "exp"])


def test_a_full_disk_during_a_training_export_stops_both_ranks_in_one_line(setup):
    """Rank 0 writes the export and fails; rank 1 must not wait for it in a collective (launched without torchrun,
    which would kill it)."""
    from test_cluster import slurm_tasks

    config, exp = setup
    tasks = slurm_tasks(config, "training.export.interval=2", "training.checkpoint.interval=null",
                        preexec_fn=lambda: file_size_limit(20_000))
    errors = [finish(task, timeout=120)[1] for task in tasks]
    assert [task.returncode for task in tasks] == [2, 2], errors
    assert errors[0].startswith("error: could not write the export of step 2: [Errno 27] File too large: ")
    assert str(exp / "export" / "llama" / ".2.partial") in errors[0] and errors[0].count("\n") == 1
    assert errors[1] == "" and not (exp / "export" / "llama" / ".2.partial").exists()


@pytest.mark.parametrize("limit, file", [(1000, "config.yaml"), (2500, "metrics.jsonl")])
def test_a_full_disk_names_the_file_it_could_not_write(setup, limit, file):
    config, exp = setup
    process = start(config, "training.checkpoint.interval=null", preexec_fn=lambda: file_size_limit(limit))
    _, err = finish(process)
    assert process.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error (rank 0): File too large ({exp / file}). ")


@pytest.mark.parametrize("limit", [200_000, 3_000_000])  # the tokenizer.json, a shard
@pytest.mark.parametrize("form", ["megatron", "fast_llm"])
def test_prepare_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, limit, form):
    result = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--demo", "--format", form, "--output",
                             str(tmp_path / "out")], capture_output=True, text=True,
                            preexec_fn=lambda: file_size_limit(limit))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "File too large; nothing of the dataset was kept" in result.stderr and not (tmp_path / "out").exists()


def test_replacing_an_export_keeps_a_whole_one_under_some_name_at_every_moment(tmp_path, monkeypatch):
    from test_export import our_model, tiny_config

    config = tiny_config()
    state = our_model(config).state_dict()
    out = tmp_path / "out"
    export.export_llama(state, config, out, max_position_embeddings=64)
    first = (out / "model.safetensors").read_bytes()
    real = Path.rename

    def killed_after_the_old_went_aside(self, target):
        if Path(target) == out:
            raise KeyboardInterrupt  # killed between the two renames
        return real(self, target)

    monkeypatch.setattr(Path, "rename", killed_after_the_old_went_aside)
    with pytest.raises(KeyboardInterrupt):
        export.export_llama(state, config, out, max_position_embeddings=64, overwrite=True)
    assert (tmp_path / ".out.old" / "model.safetensors").read_bytes() == first  # the old export, whole
    monkeypatch.undo()
    export.export_llama(state, config, out, max_position_embeddings=64, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == first and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------------------------------------
# Start-up


def test_ctrl_c_while_torch_imports_is_quiet(setup):
    config, _ = setup
    process = subprocess.Popen([sys.executable, "train.py", str(config)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # python is up, torch is being imported (seconds)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode in (-signal.SIGINT, 130) and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# Data


@pytest.mark.parametrize("span", [(-50, 10**6), (50, 10), (90, 500)])
@pytest.mark.parametrize("form", ["v2 index", "single file"])
def test_a_loss_masking_span_outside_its_document_is_refused_naming_both(tmp_path, span, form):
    from data import DataError, FileDataset, MemmapDataset
    from test_data import fast_llm_by_hand, write_by_hand

    docs = [list(range(100)) for _ in range(4)]  # 100-token documents; document 2 holds the bad span
    spans = [[(0, 10)], [], [(5, 20), span], [(99, 100)]]  # [begin, end)
    if form == "v2 index":
        last = [[(b, e - 1) for b, e in doc] for doc in spans]  # as the index stores them
        write_by_hand(tmp_path / "d", docs, code=4, fmt="i", version=2, spans=last)
        where, open_it = tmp_path / "d.idx", lambda: MemmapDataset(tmp_path / "d")
    else:
        where = fast_llm_by_hand(tmp_path / "d.fast_llm_dataset", docs, "i", "int32", {"loss_masking_spans": spans})
        open_it = lambda: FileDataset(where)  # noqa: E731
    with pytest.raises(DataError, match=re.escape(f"{where}: document 2 has a loss-masking span [{span[0]}, ")):
        open_it()


# ---------------------------------------------------------------------------------------------
# Found by fault injection: inputs that lost work or ended in a traceback


@pytest.mark.parametrize("source, output", [("12", "12"), ("exp", "exp"), ("12", "exp"), ("12", "12/hf"),
                                            ("exp", "exp/checkpoints/hf")])
def test_an_export_never_lands_on_or_inside_what_it_exports(setup, source, output):
    config, exp = setup
    assert train.main([str(config)]) == 0
    where = {"12": exp / "checkpoints" / "12", "exp": exp}
    before = sorted(p.relative_to(exp) for p in exp.rglob("*"))
    result = run_export(where[source], where[output.split("/")[0]].joinpath(*output.split("/")[1:]), "--overwrite")
    assert result.returncode == 2 and "holds or lies inside" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.relative_to(exp) for p in exp.rglob("*")) == before


@pytest.mark.parametrize("name", ["checkpoints", "export", "cache"])
def test_a_file_where_the_run_keeps_a_folder_is_refused_before_anything_is_written(setup, capsys, name):
    config, exp = setup
    assert train.main([str(config), "training.train_iters=3"]) == 0
    lines = (exp / "metrics.jsonl").read_text()
    checkpoint.remove(exp / name)
    (exp / name).write_text("not a folder")
    assert train.main([str(config)]) == 2
    assert f"{exp / name} must be a folder, not a file" in capsys.readouterr().err
    assert (exp / "metrics.jsonl").read_text() == lines


def test_an_export_that_fails_at_a_checkpoint_step_keeps_the_checkpoint(setup, monkeypatch, capsys):
    config, exp = setup

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "somewhere")

    monkeypatch.setattr(export, "export_llama", full)
    assert train.main([str(config), "training.export.interval=6"]) == 2
    assert "could not write the export of step 6" in capsys.readouterr().err
    assert checkpoint.checkpoint_steps(exp) == [6, 3]  # step 6's training is kept; export.py can export it


def test_config_values_past_64_bits_or_not_utf8_are_one_line(tmp_path, capsys):
    from schema import ConfigError, load_config

    with pytest.raises(ConfigError, match="`batch.sequence_length` must fit in 64 bits"):
        load_config(str(ROOT / "config" / "tiny.yaml"), ["batch.sequence_length=100000000000000000000"])
    (tmp_path / "latin1.yaml").write_bytes("training: {train_iters: 10}  # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml is not UTF-8"):
        load_config(str(tmp_path / "latin1.yaml"), [])


def test_blend_weights_that_overflow_and_a_bad_pretrained_config_are_refused(setup, tmp_path):
    from data import Data, DataConfig, DataError

    config, exp = setup
    data = yaml.safe_load(config.read_text())["data"]["path"]
    blend = tmp_path / "blend.json"
    blend.write_text(json.dumps({"datasets": [{"prefix": str(Path(data).parent / "hand"), "weight": 1e308}] * 2}))
    with pytest.raises(DataError, match="add up past a float's range"):
        Data(DataConfig(path=str(blend)), 32, 64)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 64, "hidden_size": "x",
                                                "intermediate_size": 64, "num_hidden_layers": 2,
                                                "num_attention_heads": 0}))
    with pytest.raises(export.ExportError, match="hidden_size 'x', num_attention_heads 0; each must be a positive"):
        export.base_model_dict_from_hf(hf)


def test_a_garbled_shard_or_model_file_that_the_manifest_vouches_for_is_one_line(setup, tmp_path, capsys):
    """Written so by a faulty writer (hashes made after the damage): the resume stops, the export refuses."""
    config, exp = setup
    assert train.main([str(config)]) == 0
    newest = exp / "checkpoints" / "12"
    for name in (SHARD, "model.safetensors"):
        manifest = json.loads((newest / "manifest.json").read_text())
        manifest[name] = checkpoint.write_file(newest / name, [os.urandom(4096)])
        (newest / "manifest.json").write_text(json.dumps(manifest))
    result = run_export(newest, tmp_path / "hf")
    assert result.returncode == 2 and "is not a readable safetensors file" in result.stderr
    assert result.stderr.count("\n") == 1
    assert train.main([str(config), "training.train_iters=14"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {newest}: ") and err.count("\n") == 1 and "Traceback" not in err


def test_prepare_takes_no_more_workers_than_cores(tmp_path):
    (tmp_path / "a.txt").write_text("some text to tokenize, " * 50)
    result = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--input", str(tmp_path / "a.txt"),
                             "--vocab-size", "300", "--workers", "100000", "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and (tmp_path / "out" / "fast_llm_dataset.json").is_file(), result.stderr


@pytest.mark.parametrize("field, value", [("step", "abc"), ("step", -4), ("consumed", {"train": "x"}),
                                          ("world_size", 0), ("sequence_length", None)])
def test_a_trainer_state_of_impossible_values_is_damage_and_falls_back(setup, capsys, field, value):
    config, exp = setup
    expected = run_to_12_keeping_all(config, exp)
    newest = exp / "checkpoints" / "12"
    state = json.loads((newest / "trainer.json").read_text())
    if value is None:
        del state[field]
    else:
        state[field] = value
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["trainer.json"] = checkpoint.write_file(newest / "trainer.json", [json.dumps(state).encode()])
    (newest / "manifest.json").write_text(json.dumps(manifest))  # vouched for: a writer's fault, not a flipped bit
    logged_until(exp, 9)
    assert train.main([str(config)]) == 0
    assert f"{newest / 'trainer.json'} holds impossible values" in capsys.readouterr().err
    assert_same_run(exp, expected)


def test_dry_run_finds_an_empty_split_that_the_run_reads(setup, capsys):
    config, exp = setup
    assert train.main([str(config), "--dry-run", "data.split=[1,0,0]", "training.validation.interval=null"]) == 2
    assert "training.test_iters is 1 but the test split of data.split [1.0, 0.0, 0.0] holds no sample" in \
        capsys.readouterr().err
    assert not exp.exists()


def test_no_config_file_asks_for_the_config_file_only(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "required: CONFIG.yaml\n" in err and "section.key=value\n" not in err.splitlines()[-1]
