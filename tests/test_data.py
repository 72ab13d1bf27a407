"""data.py: the memmap format, the dataset JSON, splits, blends, sampling, the loader, `prepare`."""

import json
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import SPLITS, Data, DataConfig, DataError, Loader, MemmapDataset, write_dataset

ROOT = Path(__file__).resolve().parent.parent


def write_json(path: Path, datasets: list[dict]) -> Path:
    path.write_text(json.dumps({"datasets": datasets}))
    return path


def stream_dataset(tmp_path: Path, sizes: list[int], name="d", dtype=np.int32, offset=0) -> Path:
    """A dataset whose tokens are their own position in the stream (plus offset): every token says where it came from."""
    tokens = np.arange(sum(sizes)) + offset
    docs = np.split(tokens, np.cumsum(sizes)[:-1])
    write_dataset(tmp_path / name, docs, dtype)
    return tmp_path / name


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*")) if path.exists() else []


# ---------------------------------------------------------------------------------------------------
# The memmap format


@pytest.mark.parametrize("code", sorted(data.DTYPES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = np.dtype(data.DTYPES[code])
    rng = np.random.default_rng(code)
    docs = [rng.integers(0, 100, size).astype(dtype) for size in (5, 0, 17, 1, 40)]
    assert write_dataset(tmp_path / "x", docs, dtype) == (5, 63)
    header = (tmp_path / "x.idx").read_bytes()[:34]
    assert header[:9] == b"MMIDIDX\x00\x00" and header[17] == code
    ds = MemmapDataset(tmp_path / "x")
    assert ds.dtype == dtype and ds.num_documents == 5 and ds.num_tokens == 63
    assert ds.sizes.tolist() == [5, 0, 17, 1, 40]
    assert ds.pointers.tolist() == (np.array([0, 5, 5, 22, 23]) * dtype.itemsize).tolist()
    for i, doc in enumerate(docs):
        np.testing.assert_array_equal(ds.document(i), doc)
    np.testing.assert_array_equal(ds.read(3, 20), np.concatenate(docs)[3:23])


def write_by_hand(prefix: Path, docs: list[list[int]], code: int, fmt: str, order: list[int], gap: int = 0):
    """docs/formats.md section 1 with struct, not our writer: documents stored in `order` in .bin, `gap` junk
    bytes before each, so only the .idx pointers find them."""
    item = struct.calcsize("<" + fmt)
    blob, pointers = b"", [0] * len(docs)
    for i in order:
        blob += b"\xff" * gap
        pointers[i] = len(blob)
        blob += struct.pack(f"<{len(docs[i])}{fmt}", *docs[i])
    n = len(docs)
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code) + struct.pack("<Q", n) + struct.pack("<Q", n + 1)
    idx += struct.pack(f"<{n}i", *map(len, docs)) + struct.pack(f"<{n}q", *pointers) + struct.pack(f"<{n + 1}q", *range(n + 1))
    Path(f"{prefix}.bin").write_bytes(blob)
    Path(f"{prefix}.idx").write_bytes(idx)
    assert item and len(idx) == 34 + 12 * n + 8 * (n + 1)


@pytest.mark.parametrize("gap, order", [(0, None), (2, "reversed")], ids=["contiguous", "scattered"])
def test_dataset_written_byte_by_byte_reads_back(tmp_path, gap, order):
    docs = [list(range(100 * d, 100 * d + size)) for d, size in enumerate([7, 3, 12, 1, 9, 5, 8, 6, 10, 4])]
    order = list(range(10))[::-1] if order else list(range(10))
    write_by_hand(tmp_path / "hand", docs, code=3, fmt="h", order=order, gap=gap)
    ds = MemmapDataset(tmp_path / "hand")
    assert ds.dtype == np.int16 and ds.num_documents == 10 and ds.num_tokens == 65
    assert ds.contiguous == (gap == 0)
    for i, doc in enumerate(docs):
        assert ds.document(i).tolist() == doc
    stream = sum(docs, [])
    # Through Data: with split [1, 0, 0] the train windows of length 5 + 1 are the stream cut at stride 5.
    path = write_json(tmp_path / "d.json", [{"prefix": "hand", "weight": 1}])
    d = Data(DataConfig(path=str(path), split=[1, 0, 0]), 5, 1000, seed=0)
    n = d.num_samples("train")
    assert n == (65 - 1) // 5
    got = sorted(d.samples("train", 0, n).tolist())
    assert got == sorted(stream[5 * k : 5 * k + 6] for k in range(n))


# ---------------------------------------------------------------------------------------------------
# Bad input: a DataError that names the file, and nothing written.


def corrupt(tmp_path, how):
    prefix = stream_dataset(tmp_path, [10, 20, 30], dtype=np.int16)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    raw = bytearray(idx.read_bytes())
    if how.startswith("missing"):
        (bin_ if how == "missing bin" else idx).unlink()
        return
    if how == "magic":
        raw[:9] = b"NOTANIDX\x00"
    elif how == "version":
        raw[9:17] = struct.pack("<Q", 2)
    elif how == "dtype code":
        raw[17] = 9
    elif how == "index length":
        raw = raw[:-8]
    elif how == "short header":
        raw = raw[:20]
    elif how == "pointer past bin":
        raw[34 + 12 + 8 : 34 + 12 + 16] = struct.pack("<q", 1000)  # document 1's pointer
    elif how == "negative size":
        raw[34:38] = struct.pack("<i", -1)
    elif how == "bin too short":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif how == "empty":
        write_dataset(prefix, [], np.int16)
        return
    idx.write_bytes(bytes(raw))


BAD_FILES = {
    "missing bin": "d.bin: file not found", "missing idx": "d.idx: file not found", "magic": "not the memmap magic",
    "version": "version 2", "dtype code": "unknown dtype code 9", "index length": "truncated or corrupt",
    "short header": "shorter than the 34-byte header", "pointer past bin": "document 1 has 20 tokens at byte 1000",
    "negative size": "document 0 has -1 tokens", "bin too short": "document 2 has 30 tokens", "empty": "no documents",
}


@pytest.mark.parametrize("how", BAD_FILES)
def test_bad_memmap_files(tmp_path, how):
    corrupt(tmp_path, how)
    path = write_json(tmp_path / "d.json", [{"prefix": "d", "weight": 1}])
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=BAD_FILES[how]) as error:
        Data(DataConfig(path=str(path), split=[1, 0, 0]), 4, 100, 0, cache_dir=cache)
    assert str(tmp_path / "d") in str(error.value)
    assert not cache.exists()


BAD_JSON = {
    "not found": (None, "not found"),
    "invalid": ("{datasets: ", "not valid JSON"),
    "no datasets": ('{"data": []}', 'no "datasets" list'),
    "no prefix": ('{"datasets": [{"weight": 1}]}', r'datasets\[0\]: no "prefix"'),
    "zero weight": ('{"datasets": [{"prefix": "d", "weight": 0}]}', '"weight" is 0'),
    "text weight": ('{"datasets": [{"prefix": "d", "weight": "1"}]}', "\"weight\" is '1'"),
    "missing weight in a blend": ('{"datasets": [{"prefix": "d", "weight": 1}, {"prefix": "d"}]}', r'datasets\[1\]: "weight" is None'),
    "stale counts": ('{"datasets": [{"prefix": "d", "weight": 1, "num_tokens": 5}]}', '"num_tokens" is 5 but'),
}


@pytest.mark.parametrize("how", BAD_JSON)
def test_bad_dataset_json(tmp_path, how):
    stream_dataset(tmp_path, [10, 20, 30])
    text, message = BAD_JSON[how]
    path = tmp_path / "d.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=message) as error:
        Data(DataConfig(path=str(path)), 4, 100, 0, cache_dir=tmp_path / "cache")
    assert str(path) in str(error.value)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("config, message", [
    (DataConfig(format="files", path="x"), "data.format: 'files'"),
    (DataConfig(path=None), "data.path: required"),
    (DataConfig(path="x", split=[1, 1]), r"data.split: \[1, 1\]"),
    (DataConfig(path="x", split=[1, -1, 1]), "data.split"),
    (DataConfig(path="x", split=[0, 0, 0]), "data.split"),
])
def test_bad_config_values(config, message):
    with pytest.raises(DataError, match=message):
        Data(config, 4, 100, 0)


def test_empty_train_split_and_empty_splits(tmp_path):
    stream_dataset(tmp_path, [10, 20, 30])
    path = write_json(tmp_path / "d.json", [{"prefix": "d", "weight": 1}])
    with pytest.raises(DataError, match="train split .* holds no window of 61 tokens"):
        Data(DataConfig(path=str(path)), 60, 100, 0)
    d = Data(DataConfig(path=str(path), split=[1, 0, 0]), 4, 100, 0)
    assert d.num_samples("validation") == 0
    loader = Loader(d, "validation", 0, 2, 1)  # constructing one is fine: train.py builds it even when unused
    with pytest.raises(DataError, match="validation split .* is empty"):
        loader.next_batch()


def test_tokens_outside_the_vocabulary(tmp_path):
    stream_dataset(tmp_path, [50, 50])
    path = write_json(tmp_path / "d.json", [{"prefix": "d", "weight": 1}])
    d = Data(DataConfig(path=str(path), split=[1, 0, 0]), 9, 50, 0)
    with pytest.raises(DataError, match="outside the model's vocabulary 0..49"):
        d.samples("train", 0, d.num_samples("train"))


# ---------------------------------------------------------------------------------------------------
# Splits, windows, blends, determinism


def test_splits_are_whole_disjoint_documents_and_windows_are_the_stream(tmp_path):
    sizes = np.random.default_rng(0).integers(1, 30, 200).tolist()
    stream_dataset(tmp_path, sizes)
    path = write_json(tmp_path / "d.json", [{"prefix": "d", "weight": 1}])
    split, L = [80, 15, 5], 8
    d = Data(DataConfig(path=str(path), split=split), L, 10_000, seed=3)
    edges = data.split_boundaries(200, split)
    assert edges.tolist() == [0, 160, 190, 200]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    seen = set()
    for s, name in enumerate(SPLITS):
        first, end = starts[edges[s]], starts[edges[s + 1]]  # the split's tokens, whole documents
        n = d.num_samples(name)
        assert n == (end - first - 1) // L
        epoch = d.samples(name, 0, n).numpy()
        # Each window is L + 1 consecutive stream tokens (across document boundaries), inside the split.
        assert (np.diff(epoch, axis=1) == 1).all()
        assert epoch.min() >= first and epoch.max() < end
        # One epoch reads every window once, in shuffled order.
        assert sorted(epoch[:, 0].tolist()) == list(range(first, first + n * L, L))
        assert epoch[:, 0].tolist() != sorted(epoch[:, 0].tolist())
        tokens = set(epoch.ravel().tolist())
        assert not tokens & seen
        seen |= tokens
        # The next epoch is a different shuffle of the same windows.
        again = d.samples(name, n, n).numpy()
        assert sorted(again[:, 0].tolist()) == sorted(epoch[:, 0].tolist()) and (again != epoch).any()


def test_blend_proportions_and_empty_part_left_out(tmp_path):
    stream_dataset(tmp_path, [40] * 50, name="a")  # tokens 0 .. 1999
    stream_dataset(tmp_path, [25] * 100, name="b", offset=10_000)  # tokens 10000 ..
    stream_dataset(tmp_path, [30] * 2, name="c", offset=20_000)  # both documents go to train
    path = write_json(tmp_path / "d.json", [{"prefix": "a", "weight": 3}, {"prefix": "b", "weight": 1},
                                            {"prefix": "c", "weight": 1}])
    d = Data(DataConfig(path=str(path), split=[8, 2, 0]), 7, 30_000, seed=1)
    n = d.num_samples("train")
    source = d.samples("train", 0, 4 * n)[:, 0].numpy() // 10_000
    for epoch in range(4):
        counts = np.bincount(source[epoch * n : (epoch + 1) * n], minlength=3)
        assert counts.sum() == n and np.abs(counts - n * np.array([0.6, 0.2, 0.2])).max() <= 1
        assert counts.tolist() == np.diff(data.split_boundaries(n, [3, 1, 1])).tolist()  # the same every epoch
    # c has no validation document, so validation blends a and b only, 3 : 1.
    n = d.num_samples("validation")
    source = d.samples("validation", 0, n)[:, 0].numpy() // 10_000
    counts = np.bincount(source, minlength=3)
    assert counts[2] == 0 and np.abs(counts[:2] - n * np.array([0.75, 0.25])).max() <= 1


def test_deterministic_cached_and_keyed(tmp_path):
    stream_dataset(tmp_path, [13] * 100)
    path = write_json(tmp_path / "d.json", [{"prefix": "d", "weight": 1}])
    config = DataConfig(path=str(path), split=[90, 8, 2])
    cache = tmp_path / "cache"
    first = Data(config, 16, 2000, seed=5, cache_dir=cache)
    assert not cache.exists()  # constructing writes nothing
    reference = first.samples("train", 70, 150)
    n = first.num_samples("train")
    epochs = range(70 // n, (70 + 149) // n + 1)
    assert len(epochs) > 1 and sorted(p.name.split("-", 1)[1] for p in cache.iterdir()) == [f"train-{e}.npy" for e in epochs]
    again = Data(config, 16, 2000, seed=5, cache_dir=cache)
    assert torch.equal(again.samples("train", 70, 150), reference)  # read from the cache
    assert torch.equal(Data(config, 16, 2000, seed=5).samples("train", 70, 150), reference)  # no cache
    assert not torch.equal(Data(config, 16, 2000, seed=6).samples("train", 70, 150), reference)
    for i in range(150):  # any sample alone is the same sample
        assert torch.equal(first.samples("train", 70 + i, 1)[0], reference[i])
    # A changed dataset file (here: rewritten, so a new mtime and size) gets a new cache key.
    stream_dataset(tmp_path, [13] * 101)
    Data(config, 16, 2000, seed=5, cache_dir=cache).samples("train", 0, 1)
    assert len({p.name.split("-")[0] for p in cache.iterdir()}) == 2
    assert not list(cache.glob("*.tmp*"))


def test_random_format():
    d = Data(DataConfig(format="random"), 32, 500, seed=2)
    x = d.samples("train", 10, 4)
    assert x.shape == (4, 33) and x.dtype == torch.int64 and 0 <= x.min() and x.max() < 500
    assert torch.equal(x[1], d.samples("train", 11, 1)[0])
    assert not torch.equal(x, d.samples("validation", 10, 4))
    assert d.tokenizer_path is None


# ---------------------------------------------------------------------------------------------------
# Loader


@pytest.fixture
def stream_data(tmp_path):
    stream_dataset(tmp_path, np.random.default_rng(0).integers(5, 60, 300).tolist())
    path = write_json(tmp_path / "d.json", [{"prefix": "d", "weight": 1}])
    return Data(DataConfig(path=str(path), split=[90, 8, 2]), 12, 100_000, seed=4)


def read_steps(data, steps, consumed=0, world=1, batch=12, micro=2):
    """Each step's global batch as the ranks together read it."""
    loaders = [Loader(data, "train", consumed, batch, micro, rank, world) for rank in range(world)]
    out = []
    for _ in range(steps):
        parts = [loader.next_batch() for loader in loaders]
        assert all(len(p) == batch // world // micro and p[0].shape == (micro, 13) for p in parts)
        out.append(torch.cat([m for p in parts for m in p]))
    assert {loader.consumed_samples for loader in loaders} == {consumed + steps * batch}
    for loader in loaders:
        loader.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("loader-")]  # no reader thread left
    return out


def test_loader_ranks_and_resume(stream_data):
    n = stream_data.num_samples("train")
    steps = n // 12 + 3  # runs into the second epoch
    one = read_steps(stream_data, steps)
    assert torch.equal(torch.cat(one), stream_data.samples("train", 0, steps * 12))
    assert all(torch.equal(a, b) for a, b in zip(read_steps(stream_data, steps, world=2), one))
    assert all(torch.equal(a, b) for a, b in zip(read_steps(stream_data, steps, world=3), one))
    # Resume from a consumed count, on another number of ranks, continues exactly.
    assert all(torch.equal(a, b) for a, b in zip(read_steps(stream_data, 5, consumed=7 * 12, world=2), one[7:12]))
    assert all(torch.equal(a, b) for a, b in zip(read_steps(stream_data, 5, consumed=7 * 12, world=6, micro=1), one[7:12]))


def test_loader_follows_a_moved_position_and_checks_sizes(stream_data):
    loader = Loader(stream_data, "validation", 0, 4, 2)
    loader.next_batch()  # the batch at 4 is now read ahead ...
    loader.consumed_samples = 40  # ... but the caller moved the position: the read-ahead is dropped
    assert torch.equal(torch.cat(loader.next_batch()), stream_data.samples("validation", 40, 4))
    loader.close()
    with pytest.raises(DataError, match="do not split into 2 ranks of micro-batches of 4; use a multiple of 8"):
        Loader(stream_data, "train", 0, 12, 4, 0, 2)


# ---------------------------------------------------------------------------------------------------
# prepare


def run_prepare(*args):
    return subprocess.run([sys.executable, str(ROOT / "data.py"), "prepare", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run_prepare("--demo", "--output", out)
    assert result.returncode == 0, result.stderr
    return out


def test_demo_dataset(demo):
    spec = json.loads((demo / "fast_llm_dataset.json").read_text())["datasets"]
    assert [s["prefix"] for s in spec] == ["shard_0"] and spec[0]["weight"] == 1.0
    ds = MemmapDataset(demo / "shard_0")
    assert ds.dtype == np.int16 and ds.num_documents > 500 and ds.num_tokens > 1_000_000
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(demo / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == 4096
    bos, eos = tokenizer.token_to_id("<|begin_of_text|>"), tokenizer.token_to_id("<|end_of_text|>")
    doc = ds.document(0).tolist()
    assert doc[0] == bos and doc[-1] == eos and "PERSONS REPRESENTED" in tokenizer.decode(doc)
    d = Data(DataConfig(path=str(demo / "fast_llm_dataset.json"), split=[90, 8, 2]), 256, 4096, seed=0)
    assert all(d.num_samples(s) > 50 for s in SPLITS) and d.tokenizer_path == demo / "tokenizer.json"
    assert d.samples("test", 0, 2).shape == (2, 257)


def test_prepare_text_and_jsonl(demo, tmp_path):
    texts = ["To be, or not to be, that is the question.", "Now is the winter of our discontent.", "Ay me!"]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, text in enumerate(texts[:2]):
        (folder / f"{i}.txt").write_text(text)
    (tmp_path / "more.jsonl").write_text(json.dumps({"id": 1, "body": texts[2]}) + "\n\n")
    out = tmp_path / "out"
    result = run_prepare("--input", folder, tmp_path / "*.jsonl", "--text-field", "body", "--tokenizer",
                         demo / "tokenizer.json", "--output", out, "--no-bos", "--workers", 2, "--shard-tokens", 20)
    assert result.returncode == 0, result.stderr
    from tokenizers import Tokenizer

    assert (out / "tokenizer.json").read_bytes() == (demo / "tokenizer.json").read_bytes()
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|end_of_text|>")
    spec = json.loads((out / "fast_llm_dataset.json").read_text())["datasets"]
    docs = []
    for shard in spec:
        ds = MemmapDataset(out / shard["prefix"])
        assert shard["num_tokens"] == ds.num_tokens and shard["num_documents"] == ds.num_documents
        docs += [ds.document(i).tolist() for i in range(ds.num_documents)]
    assert len(spec) > 1 and sum(s["weight"] for s in spec) == pytest.approx(1.0)
    assert spec[0]["weight"] == pytest.approx(spec[0]["num_tokens"] / sum(s["num_tokens"] for s in spec))
    assert [tokenizer.decode(doc[:-1]) for doc in docs] == texts and all(doc[-1] == eos for doc in docs)
    # The same with one worker, written in one shard, holds the same tokens.
    again = run_prepare("--input", folder, tmp_path / "more.jsonl", "--text-field", "body", "--tokenizer",
                        demo / "tokenizer.json", "--output", tmp_path / "one", "--no-bos", "--workers", 1)
    assert again.returncode == 0, again.stderr
    one = MemmapDataset(tmp_path / "one" / "shard_0")
    assert [one.document(i).tolist() for i in range(3)] == docs


def test_prepare_trains_bpe_on_input(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"line {i} of some text"}) + "\n" for i in range(50)))
    result = run_prepare("--input", tmp_path / "a.jsonl", "--vocab-size", 300, "--output", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    ds = MemmapDataset(tmp_path / "out" / "shard_0")
    assert ds.dtype == np.int16 and ds.num_documents == 50 and ds.document(0)[0] == 0  # BOS is token 0


def prepare_error(*args) -> str:
    """Run `prepare` in this process (a subprocess costs a second of imports); return its error message."""
    with pytest.raises(SystemExit) as exit_:
        data.main(["prepare", *map(str, args)])
    assert isinstance(exit_.value.code, str) and exit_.value.code.startswith("error: ")
    return exit_.value.code


def test_prepare_refuses_bad_input_and_writes_nothing(demo, tmp_path):
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "fine"}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    (tmp_path / "broken.json").write_text("not a tokenizer")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    tok, out = demo / "tokenizer.json", tmp_path / "out"
    cases = [
        # found while tokenizing, after shards were started: they are removed, in 1 or 2 workers
        (["--input", tmp_path / "good.jsonl", tmp_path / "bad.jsonl", "--tokenizer", tok, "--workers", 1], "bad.jsonl:2: no text field 'text' (found ['content'])"),
        (["--input", tmp_path / "good.jsonl", tmp_path / "bad.jsonl", "--tokenizer", tok, "--workers", 2], "bad.jsonl:2: no text field 'text'"),
        (["--input", tmp_path / "bad.jsonl", "--text-field", "content"], "bad.jsonl:1: no text field 'content'"),  # found while training
        (["--input", tmp_path / "latin1.txt", "--tokenizer", tok], "latin1.txt: not UTF-8 text"),
        (["--input", tmp_path / "nothing*.txt", "--tokenizer", tok], "no such file, folder or glob match"),
        (["--input", tmp_path / "good.jsonl", "--tokenizer", tmp_path / "broken.json"], "does not load as a Hugging Face tokenizer.json"),
        (["--input", tmp_path / "good.jsonl", "--tokenizer", tok, "--bos-token", "<s>"], "no token '<s>'"),
        ([], "give either --demo or --input"),
        (["--input", tmp_path / "empty.txt", "--tokenizer", tok], "the inputs hold no text"),
        (["--demo", "--vocab-size", 100], "--vocab-size 100: must be at least 258"),
    ]
    for args, message in cases:
        assert message in prepare_error(*args, "--output", out), args
        assert not out.exists(), args
    # From the command line: a non-zero exit, one paragraph, no traceback.
    result = run_prepare("--input", tmp_path / "bad.jsonl", "--output", out)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and not out.exists()


def test_prepare_parquet(demo, tmp_path, monkeypatch):
    import pyarrow  # requirements-test.txt installs it for this test
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"body": ["Good morrow.", "Farewell."]}), tmp_path / "a.parquet")
    assert "no column 'text'" in prepare_error("--input", tmp_path / "a.parquet", "--output", tmp_path / "out")
    data.main(["prepare", "--input", str(tmp_path / "a.parquet"), "--text-field", "body", "--tokenizer",
               str(demo / "tokenizer.json"), "--output", str(tmp_path / "out"), "--workers", "1"])
    ds = MemmapDataset(tmp_path / "out" / "shard_0")
    assert ds.num_documents == 2
    import tokenizers
    decoded = tokenizers.Tokenizer.from_file(str(demo / "tokenizer.json")).decode(ds.document(1).tolist())
    assert "Farewell." in decoded
    # Without pyarrow the error says what to install, and nothing is written.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert "needs pyarrow" in prepare_error("--input", tmp_path / "a.parquet", "--output", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_prepare_refuses_to_overwrite(demo, tmp_path):
    (tmp_path / "a.txt").write_text("First version.")
    out = tmp_path / "out"
    args = ["--input", tmp_path / "a.txt", "--tokenizer", demo / "tokenizer.json", "--output", out, "--workers", 1]
    assert run_prepare(*args).returncode == 0
    before = {p: p.read_bytes() for p in files_under(out)}
    tokens = MemmapDataset(out / "shard_0").num_tokens
    (tmp_path / "a.txt").write_text("Second version, longer than the first.")
    result = run_prepare(*args)
    assert result.returncode != 0 and "already holds a dataset" in result.stderr and "--overwrite" in result.stderr
    assert {p: p.read_bytes() for p in files_under(out)} == before
    assert run_prepare(*args, "--overwrite").returncode == 0
    assert MemmapDataset(out / "shard_0").num_tokens > tokens
    assert sorted(p.name for p in out.iterdir()) == ["fast_llm_dataset.json", "shard_0.bin", "shard_0.idx", "tokenizer.json"]
