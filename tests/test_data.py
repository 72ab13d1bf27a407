"""data.py: the memmap format, the dataset JSON, splits, blends, sampling, the loader; prepare.py."""

import contextlib
import dataclasses
import io
import json
import re
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import data
import prepare
import schema
import train
from data import SPLITS, Data, DataConfig, DataError, Loader, MemmapDataset, SamplingConfig
from model import Llama
from prepare import write_dataset
from test_model import build as build_model
from test_train import CONFIG as TRAIN_CONFIG, metrics as train_metrics

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


@pytest.mark.parametrize("code", sorted(data.TOKEN_DTYPES))
def test_round_trip_every_dtype(tmp_path, code):
    dtype = np.dtype(data.TOKEN_DTYPES[code])
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


def write_by_hand(prefix: Path, docs: list[list[int]], code: int, fmt: str, order: list[int] | None = None,
                  gap: int = 0, version: int = 1, spans=None, preference=None, flags=None, index_length=None,
                  tail=b""):
    """The .idx/.bin layout of docs/formats.md with struct, not our writer: documents stored in `order` in .bin,
    `gap` junk bytes before each, so only the .idx pointers find them. Version 2 adds each document's loss-masking
    `spans` [(begin, last), ...], version 3 its `preference` spans ((chosen begin, last), (rejected begin, last));
    `flags` overrides the flag bytes, `index_length` the document index's length; `tail` goes last."""
    blob, pointers = b"", [0] * len(docs)
    for i in range(len(docs)) if order is None else order:
        blob += b"\xff" * gap
        pointers[i] = len(blob)
        blob += struct.pack(f"<{len(docs[i])}{fmt}", *docs[i])
    n, index_length = len(docs), len(docs) + 1 if index_length is None else index_length
    flags = [spans is not None, preference is not None][: version - 1] if flags is None else flags
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", version) + bytes(flags) + struct.pack("<BQQ", code, n, index_length)
    idx += struct.pack(f"<{n}i", *map(len, docs)) + struct.pack(f"<{n}q", *pointers)
    if spans is not None:
        flat = [x for doc in spans for span in doc for x in span]
        idx += struct.pack(f"<{n}i", *map(len, spans)) + struct.pack(f"<{len(flat)}i", *flat)
    if preference is not None:
        idx += b"".join(struct.pack(f"<{2 * n}i", *[x for doc in preference for x in doc[k]]) for k in (0, 1))
    Path(f"{prefix}.bin").write_bytes(blob)
    Path(f"{prefix}.idx").write_bytes(idx + struct.pack(f"<{index_length}q", *range(index_length)) + tail)


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
    # Through Data: with split [1, 0, 0] and no shuffle the samples of 5 + 1 are the stream cut at stride 5, the
    # last one running into the next epoch.
    path = write_json(tmp_path / "d.json", [{"prefix": "hand", "weight": 1}])
    d = Data(DataConfig(path=str(path), split=[1, 0, 0], sampling=SamplingConfig(shuffle="disabled")), 5, 1000, 0)
    n = d.num_samples("train")
    assert n == 65 // 5
    assert d.samples("train", 0, n).tolist() == [(stream * 2)[5 * k : 5 * k + 6] for k in range(n)]


# ---------------------------------------------------------------------------------------------------
# Fast-LLM's formats and Megatron's variants, built byte by byte


DOCS = [list(range(100 * d, 100 * d + size)) for d, size in enumerate([7, 3, 12, 1, 9, 5, 8, 6, 10, 4])]
SPANS = [[(1, 3), (5, 7)], [], [(0, 12)], [(0, 1)], [(8, 9)], [], [(2, 4), (3, 6)], [(0, 6)], [(9, 10)], []]  # [b, e)


def expected_spans(docs=DOCS, spans=SPANS) -> list[list[int]]:
    starts = np.cumsum([0] + [len(d) for d in docs]).tolist()
    return sorted([starts[i] + b, starts[i] + e] for i, doc in enumerate(spans) for b, e in doc)


def fast_llm_by_hand(path: Path, docs=DOCS, fmt="h", data_type="int16", ranges: dict | None = None, **config):
    """A .fast_llm_dataset as docs/formats.md lays it out, with struct: sections between markers in a language-model
    section, then the JSON config; `ranges` maps loss_masking_spans, chosen_spans, rejected_spans to [b, e) spans."""
    out, n = bytearray(b"fast_llm_prepared_dataset" + bytes(8) + b"lm begin"), len(docs)

    def section(marker: bytes, payload: bytes, **fields) -> dict:
        begin = len(out)
        out.extend(marker + b" begin" + payload + marker + b" end")
        return dict(begin=begin, end=len(out), **fields)

    sizes = np.cumsum([0] + [len(d) for d in docs]).tolist()
    lm = {"type": "language_model", "begin": 33}
    payload = struct.pack(f"<{sizes[-1]}{fmt}", *sum(docs, [])) + struct.pack(f"<{n + 1}q", *sizes)
    lm["tokens"] = section(b"token", payload, type="token", num_documents=n, num_tokens=sizes[-1], data_type=data_type)
    for name, spans in (ranges or {}).items():
        counts = np.cumsum([0] + [len(s) for s in spans]).tolist()
        flat = [x for doc in spans for span in doc for x in span]
        lm[name] = section(b"range", struct.pack(f"<{len(flat)}i", *flat) + struct.pack(f"<{n + 1}i", *counts),
                           type="range", num_documents=n, num_ranges=counts[-1])
    out.extend(b"lm end")
    lm.update(end=len(out), **config)
    blob = json.dumps({k: lm.get(k, {"type": "none"}) for k in (*lm, "loss_masking_spans", "chosen_spans")}).encode()
    out[25:33] = len(out).to_bytes(8, "big")
    path.write_bytes(bytes(out) + len(blob).to_bytes(4, "big") + blob)
    return path


LAST = [[(b, e - 1) for b, e in doc] for doc in SPANS]  # the .idx stores spans as [begin, last]
PREFERENCE = [((0, 1), (2, len(doc) - 1)) for doc in DOCS]
INDEXES = {  # version, write_by_hand's extras, whether loss-masking spans are read
    "v1": (1, {}, False),
    "v2 no spans": (2, {}, False),
    "v2 spans": (2, dict(spans=LAST), True),
    "v2 span counts without the flag": (2, dict(spans=[[]] * 10, flags=[0]), False),  # Fast-LLM writes this
    "v3 plain": (3, {}, False),
    "v3 spans": (3, dict(spans=LAST), True),
    "v3 preference": (3, dict(preference=PREFERENCE), False),
    "v3 spans and preference": (3, dict(spans=LAST, preference=PREFERENCE), True),
    "Megatron multimodal, text only": (1, dict(index_length=6, tail=bytes(10)), False),
}


@pytest.mark.parametrize("case", INDEXES)
def test_index_versions_read_back(tmp_path, case):
    version, extras, spans = INDEXES[case]
    write_by_hand(tmp_path / "x", DOCS, code=4, fmt="i", version=version, **extras)
    ds = data.open_dataset(tmp_path / "x")
    assert [ds.document(i).tolist() for i in range(10)] == DOCS and ds.num_tokens == 65 and ds.dtype == np.int32
    assert ds.has_spans == spans and (not spans or ds.spans().tolist() == expected_spans())
    if "preference" in extras:
        assert ds.preference.tolist() == [[list(p[k]) for p in PREFERENCE] for k in (0, 1)]


@pytest.mark.parametrize("spans", [False, True])
def test_single_file_reads_back_through_byte_offsets(tmp_path, spans):
    ranges = dict(loss_masking_spans=SPANS, chosen_spans=[[(0, 1)]] * 10, rejected_spans=[[(1, 2)]] * 10)
    ranges = ranges if spans else {}
    ds = data.open_dataset(fast_llm_by_hand(tmp_path / "x.fast_llm_dataset", ranges=ranges))
    assert isinstance(ds, data.FileDataset) and [ds.document(i).tolist() for i in range(10)] == DOCS
    assert ds.has_spans == spans and (not spans or ds.spans().tolist() == expected_spans())
    # Views into the file's memory map at byte 52 (unaligned for int32 and int64), not copies.
    assert not ds.tokens.flags.owndata and not ds.cumsum.flags.owndata and ds.cumsum.tolist()[-1] == 65


def test_prefixes_follow_fast_llm_then_megatron(tmp_path):
    write_by_hand(tmp_path / "wiki", DOCS, code=3, fmt="h")
    assert data.open_dataset(tmp_path / "wiki.v1").files == (tmp_path / "wiki.idx", tmp_path / "wiki.bin")
    write_by_hand(tmp_path / "web.v2", DOCS, code=3, fmt="h")  # Megatron appends: web.v2.idx
    assert data.open_dataset(tmp_path / "web.v2").files == (tmp_path / "web.v2.idx", tmp_path / "web.v2.bin")


def test_fast_llm_dataset_config(tmp_path):
    """A YAML with every type read: blended (of a blend), slice, concatenated, file, memmap of both layouts."""
    write_by_hand(tmp_path / "a", DOCS, code=4, fmt="i", version=3, spans=LAST)
    fast_llm_by_hand(tmp_path / "b.fast_llm_dataset", docs=[[d + 1000 for d in doc] for doc in DOCS])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.yaml").write_text(yaml.safe_dump({"config": {"type": "memmap", "path": "../a"},
                                                                 "metadata": {"num_tokens": 65}}))
    config = {"type": "blended", "weights": [3, 1], "datasets": [
        {"type": "blended", "weights": [1, 1], "datasets": [
            {"type": "slice", "dataset": {"type": "memmap", "path": "a"}, "begin": 0.25, "end": 0.75},
            {"type": "file", "path": "sub/inner.yaml"}]},
        {"type": "concatenated", "datasets": [
            {"type": "memmap", "path": "b.fast_llm_dataset"},
            {"type": "slice", "dataset": {"type": "memmap", "path": "a"}, "end": 0.2}]},
    ]}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(config))  # the bare DATASET, as before Fast-LLM 0.4
    (sliced, w1), (whole, w2), (concatenated, w3) = data.read_datasets(tmp_path / "d.yaml")
    assert np.array([w1, w2, w3]).tolist() == (np.array([0.375, 0.375, 0.25]) * (w1 + w2 + w3)).tolist()
    assert [sliced.document(i).tolist() for i in range(sliced.num_documents)] == DOCS[2:8]  # round(2.5), round(7.5)
    assert whole.files[0].resolve() == tmp_path / "a.idx" and whole.has_spans
    assert concatenated.read(0, 75).tolist() == [t + 1000 for doc in DOCS for t in doc] + DOCS[0] + DOCS[1]
    assert concatenated.num_documents == 12 and concatenated.has_spans
    assert concatenated.spans().tolist() == [[b + 65, e + 65] for b, e in expected_spans() if e <= 10]
    assert sliced.spans().tolist() == [[b - 10, e - 10] for b, e in expected_spans() if 10 <= b < 51]
    # Through Data, the YAML reads like our JSON, in the {config, metadata} form since Fast-LLM 0.4.
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({"config": config, "metadata": {}}))
    d = Data(DataConfig(path=str(tmp_path / "w.yaml"), split=[1, 0, 0]), 4, 2000, seed=0)
    assert sorted(part.dataset.num_tokens for part in d._parts["train"]) == [41, 65, 75]


def yaml_file(path: Path, config) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


REFUSED = {  # how to make the bad file (in tmp_path, returning data.path and the file to be named), the message
    "float32 tokens": (lambda p: write_by_hand(p / "x", DOCS, code=6, fmt="f"), "dtype code 6 is a float type"),
    "float64 tokens": (lambda p: write_by_hand(p / "x", DOCS, code=7, fmt="d"), "dtype code 7 is a float type"),
    "Megatron images": (lambda p: write_by_hand(p / "x", DOCS, code=4, fmt="i", tail=bytes([0, 1] * 5)),
                        "Megatron multimodal index: 5 of its 10 sequences are not text"),
    "index version 4": (lambda p: write_by_hand(p / "x", DOCS, code=4, fmt="i", version=4), "index version 4"),
    "span flag, no spans": (lambda p: write_by_hand(p / "x", DOCS, code=4, fmt="i", version=2, flags=[1]),
                            "version 2, 10 documents, loss-masking spans, document index of 11) makes"),
    "single file magic": (lambda p: (p / "x.fast_llm_dataset").write_bytes(b"MMIDIDX" + bytes(60)), "not a Fast-LLM"),
    "single file cut": (lambda p: (p / "x.fast_llm_dataset").write_bytes(
        fast_llm_by_hand(p / "y.fast_llm_dataset").read_bytes()[:150]), "no language-model config at byte"),
    "single file markers": (lambda p: (p / "x.fast_llm_dataset").write_bytes(
        fast_llm_by_hand(p / "y.fast_llm_dataset").read_bytes().replace(b"token end", b"token END")),
        "its token section (bytes 41.."),
    "single file images": (lambda p: fast_llm_by_hand(p / "x.fast_llm_dataset", image_patches={"type": "patch"}),
                           "holds image patches"),
    "single file floats": (lambda p: fast_llm_by_hand(p / "x.fast_llm_dataset", fmt="f", data_type="float32"),
                           "token data type 'float32'"),
    **{f"type {kind}": (lambda p, kind=kind: yaml_file(p / "x.yaml", {"type": kind}), f"dataset type '{kind}' (")
       for kind in ("random", "fim", "streaming")},
    "unknown type": (lambda p: yaml_file(p / "x.yaml", {"config": {"type": "gpt_memmap"}, "metadata": {}}),
                     "config: dataset type 'gpt_memmap'; the types read are"),
    "blend in a slice": (lambda p: yaml_file(p / "x.yaml", {"type": "slice", "dataset": {
        "type": "blended", "datasets": [{"type": "memmap", "path": "a"}] * 2, "weights": [1, 1]}}),
        "(top level).dataset: a blend, where Fast-LLM takes documents"),
    "weights": (lambda p: yaml_file(p / "x.yaml", {"type": "blended", "datasets": [{"type": "memmap", "path": "a"}],
                                                   "weights": [1, 2]}), "a blend needs"),
    "slice range": (lambda p: yaml_file(p / "x.yaml", {"type": "slice", "begin": 0.5, "end": 0.2, "dataset": {
        "type": "memmap", "path": "a"}}), "slice from 0.5 to 0.2"),
    "no path": (lambda p: yaml_file(p / "x.yaml", {"type": "memmap"}), '(top level): no "path"'),
    "missing token files": (lambda p: yaml_file(p / "x.yaml", {"type": "memmap", "path": "x_gone"}),
                            "x_gone.idx: file not found"),
    "includes itself": (lambda p: yaml_file(p / "x.yaml", {"type": "file", "path": "x.yaml"}), "nested over 16 deep"),
    "not YAML": (lambda p: (p / "x.yaml").write_text("config: [unclosed"), "not valid YAML at line 1, column 18"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refusals_name_the_file_and_write_nothing(tmp_path, case):
    make, message = REFUSED[case]
    write_by_hand(tmp_path / "a", DOCS, code=3, fmt="h")  # a good dataset for configs to name
    make(tmp_path)
    path = tmp_path / "x.yaml"
    if not path.exists():  # a bad token file, named by our JSON
        name = "x.fast_llm_dataset" if (tmp_path / "x.fast_llm_dataset").exists() else "x"
        path = write_json(tmp_path / "d.json", [{"prefix": name, "weight": 1}])
    with pytest.raises(DataError, match=re.escape(message)) as error:
        Data(DataConfig(path=str(path), split=[1, 0, 0]), 4, 100_000, 0, cache_dir=tmp_path / "cache")
    assert str(tmp_path / "x") in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "cache").exists()


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
        raw[9:17] = struct.pack("<Q", 4)
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
    "version": "index version 4", "dtype code": "unknown dtype code 9", "index length": "truncated or corrupt",
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
    stream_dataset(tmp_path, [5] * 40, name="e", offset=1000)
    path = write_json(tmp_path / "d.json", [{"prefix": "d", "weight": 1}])
    with pytest.raises(DataError, match="train split .* holds no document of"):
        Data(DataConfig(path=str(path), split=[0, 1, 0]), 60, 100, 0)
    d = Data(DataConfig(path=str(path), split=[1, 0, 0]), 4, 2000, 0)
    assert d.num_samples("validation") == 0
    loader = Loader(d, "validation", 0, 2, 1)  # constructing one is fine: train.py builds it even when unused
    with pytest.raises(DataError, match="validation split .* holds no document of .*/d; give it a larger weight"):
        loader.next_batch()
    # A blend part with no document in a split is never left out silently: reading the split names it.
    both = write_json(tmp_path / "b.json", [{"prefix": "d", "weight": 1}, {"prefix": "e", "weight": 1}])
    d = Data(DataConfig(path=str(both), split=[90, 10, 0]), 4, 2000, 0)
    assert d.num_samples("validation") == 0 and d.num_samples("train") > 0
    with pytest.raises(DataError, match=r"validation split \(\[90, 10, 0\]\) holds no document of .*/d;"):
        d.samples("validation", 0, 1)


def test_tokens_outside_the_vocabulary_are_refused_before_anything_is_written(tmp_path):
    stream_dataset(tmp_path, [50, 50])
    path = write_json(tmp_path / "d.json", [{"prefix": "d", "weight": 1}])
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="holds token 99, outside the model's vocabulary 0..49"):
        Data(DataConfig(path=str(path), split=[1, 0, 0]), 9, 50, 0, cache)  # the file's range, scanned
    assert not cache.exists()
    d = Data(DataConfig(path=str(path), split=[1, 0, 0]), 9, 100, 0, cache)
    d.samples("train", 0, 1)  # the first index written caches the scanned range beside it
    assert [json.loads(p.read_text()) for p in cache.glob("tokens-*.json")] == [[0, 99]]
    for p in cache.glob("tokens-*.json"):
        p.write_text("[0, 200]")  # what the cache says is used, not scanned again
    with pytest.raises(DataError, match="holds token 200"):
        Data(DataConfig(path=str(path), split=[1, 0, 0]), 9, 100, 0, cache)
    # a tokenizer.json beside the dataset file that is larger than the model's vocabulary
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {str(i): i for i in range(120)}}}))
    with pytest.raises(DataError, match="has 120 tokens, more than model.base_model.vocab_size 100"):
        Data(DataConfig(path=str(path), split=[1, 0, 0]), 9, 100, 0)
    # a dtype that can't hold the vocabulary's size needs no scan (uint8 below 256)
    write_by_hand(tmp_path / "small", [[1, 2, 3, 255]] * 4, code=1, fmt="B")
    small = write_json(tmp_path / "s.json", [{"prefix": "small", "weight": 1}])
    d = Data(DataConfig(path=str(small), split=[1, 0, 0]), 3, 300, 0, cache)
    assert d._ranges == {}


# ---------------------------------------------------------------------------------------------------
# Splits, windows, blends, determinism


def stream_of(d: Data, split: str, start: int, count: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Samples start .. start+count-1 laid end to end (consecutive samples share one token), and the pieces of
    documents they hold, in order, as read() marks them."""
    tokens, documents, _ = d.read(split, start, count)
    tokens = tokens.numpy()
    assert (tokens[:-1, -1] == tokens[1:, 0]).all()  # the last token of a sample starts the next
    pieces = [row[documents[k, :-1] == i] for k, row in enumerate(tokens[:, :-1]) for i in np.unique(documents[k, :-1])]
    return tokens[:, :-1].ravel(), pieces


@pytest.mark.parametrize("shuffle", ["epoch", "disabled", "skip_first_epoch", "full"])
def test_splits_are_whole_documents_read_as_a_shuffled_stream(tmp_path, shuffle):
    sizes = np.random.default_rng(0).integers(1, 30, 200).tolist()
    stream_dataset(tmp_path, sizes)
    path = write_json(tmp_path / "d.json", [{"prefix": "d", "weight": 1}])
    split, L = [80, 15, 5], 8
    config = DataConfig(path=str(path), split=split, sampling=SamplingConfig(shuffle=shuffle))
    d = Data(config, L, 10_000, seed=3, horizon={"train": 1000})
    edges = data.split_boundaries(200, split)
    assert edges.tolist() == [0, 160, 190, 200]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for s, name in enumerate(SPLITS):
        documents = [list(range(starts[i], starts[i + 1])) for i in range(edges[s], edges[s + 1])]
        n_tokens = sum(map(len, documents))
        assert d.num_samples(name) == n_tokens // L
        stream, pieces = stream_of(d, name, 0, 3 * n_tokens // L + 2)
        # Every piece is a stretch of one document of the split, in its own order.
        for piece in pieces:
            assert (np.diff(piece) == 1).all() and any(piece[0] in doc and piece[-1] in doc for doc in documents)
        # Each epoch reads each document once, whole (the tail too), in the order `shuffle` says.
        rounds = [stream[e * n_tokens : (e + 1) * n_tokens] for e in range(3)]
        for e, tokens in enumerate(rounds if shuffle != "full" or name != "train" else []):
            assert sorted(tokens.tolist()) == [t for doc in documents for t in doc], (name, e)
        in_order = [np.array_equal(r, np.concatenate(documents)) for r in rounds]
        if shuffle == "epoch":
            assert not any(in_order) and not np.array_equal(rounds[0], rounds[1])
        elif shuffle == "disabled":
            assert all(in_order)
        elif shuffle == "skip_first_epoch":
            assert in_order == [True, False, False]
    if shuffle == "full":  # the run's epochs of train at once: each document as often, but not an epoch at a time
        n_tokens = starts[160]
        epochs = -(-1000 * L // n_tokens)
        stream, _ = stream_of(d, "train", 0, epochs * n_tokens // L + 1)
        whole = stream[: epochs * n_tokens]
        assert epochs > 1 and sorted(whole.tolist()) == sorted(list(range(n_tokens)) * epochs)
        assert sorted(whole[:n_tokens].tolist()) != list(range(n_tokens))


def test_blend_proportions_and_a_part_smaller_than_a_sample(tmp_path):
    stream_dataset(tmp_path, [40] * 50, name="a")  # tokens 0 .. 1999
    stream_dataset(tmp_path, [25] * 100, name="b", offset=10_000)  # tokens 10000 ..
    stream_dataset(tmp_path, [3, 2], name="c", offset=20_000)  # 5 tokens, fewer than one sample: still its share
    path = write_json(tmp_path / "d.json", [{"prefix": "a", "weight": 3}, {"prefix": "b", "weight": 1},
                                            {"prefix": "c", "weight": 1}])
    d = Data(DataConfig(path=str(path), split=[8, 2, 0]), 7, 30_000, seed=1)
    n = d.num_samples("train")
    tokens = d.samples("train", 0, 4 * n).numpy()
    source = tokens[:, 0] // 10_000
    for epoch in range(4):
        counts = np.bincount(source[epoch * n : (epoch + 1) * n], minlength=3)
        assert counts.sum() == n and np.abs(counts - n * np.array([0.6, 0.2, 0.2])).max() <= 1
        assert counts.tolist() == np.diff(data.split_boundaries(n, [3, 1, 1])).tolist()  # the same every epoch
    assert set(tokens[source == 2].ravel().tolist()) == {20_000, 20_001, 20_002, 20_003, 20_004}  # c, repeated
    # c has no validation document: validation is refused naming it, not blended without it
    with pytest.raises(DataError, match="holds no document of .*/c"):
        d.samples("validation", 0, 1)


def test_deterministic_and_keyed_on_the_seed(tmp_path):
    stream_dataset(tmp_path, [13] * 100)
    path = write_json(tmp_path / "d.json", [{"prefix": "d", "weight": 1}])
    config = DataConfig(path=str(path), split=[90, 8, 2])
    cache = tmp_path / "cache"
    first = Data(config, 16, 2000, seed=5, cache_dir=cache)
    assert not cache.exists()  # constructing writes nothing
    reference = first.samples("train", 70, 150)
    assert [p.name.split("-")[0] for p in cache.iterdir()] == ["tokens"]  # the scanned token range, nothing else
    assert torch.equal(Data(config, 16, 2000, seed=5).samples("train", 70, 150), reference)
    assert not torch.equal(Data(config, 16, 2000, seed=6).samples("train", 70, 150), reference)
    seeded = dataclasses.replace(config, sampling=SamplingConfig(seed=5))
    assert torch.equal(Data(seeded, 16, 2000).samples("train", 70, 150), reference)  # data.sampling.seed
    for i in range(150):  # any sample alone is the same sample, whatever was read before
        assert torch.equal(first.samples("train", 70 + i, 1)[0], reference[i])
    assert not list(cache.glob("*.tmp*"))


def test_document_starts_and_their_labels(tmp_path):
    stream_dataset(tmp_path, [5, 1, 9, 4, 30, 2])
    path = write_json(tmp_path / "d.json", [{"prefix": "d", "weight": 1}])
    config = DataConfig(path=str(path), split=[1, 0, 0], sampling=SamplingConfig(ignore_document_starts=True))
    d = Data(config, 10, 100, seed=0)
    starts = {0, 5, 6, 15, 19, 49}  # the first token of each document
    tokens, documents, ignored = d.read("train", 0, 12)
    tokens = tokens.numpy()
    for k in range(12):
        begins = np.flatnonzero(np.diff(documents[k]))  + 1  # where a new document starts in the sample
        assert all(tokens[k, i] in starts for i in begins)
        assert np.flatnonzero(ignored[k]).tolist() == (begins - 1).tolist()  # the label predicting it, only
    plain = Data(dataclasses.replace(config, sampling=SamplingConfig()), 10, 100, seed=0).read("train", 0, 12)
    assert torch.equal(plain[0], d.read("train", 0, 12)[0]) and not plain[2].any()


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
    """Each step's global batch as the ranks together read it, the tokens of each (inputs, labels) pair."""
    loaders = [Loader(data, "train", consumed, batch, micro, rank, world) for rank in range(world)]
    out = []
    for _ in range(steps):
        parts = [loader.next_batch() for loader in loaders]
        assert all(len(p) == batch // world // micro for p in parts)
        for inputs, labels, documents in (micro for p in parts for micro in p):  # nothing masked: next tokens
            assert documents is None  # documents attend to each other unless the loader is asked otherwise
            assert inputs.shape == labels.shape == (micro, 12) and torch.equal(inputs[:, 1:], labels[:, :-1])
        out.append(torch.cat([torch.cat([x, y[:, -1:]], 1) for p in parts for x, y, _ in p]))
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
    assert torch.equal(torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y, _ in loader.next_batch()]),
                       stream_data.samples("validation", 40, 4))
    loader.close()
    with pytest.raises(DataError, match="do not split into 2 ranks of micro-batches of 4; use a multiple of 8"):
        Loader(stream_data, "train", 0, 12, 4, 0, 2)


# ---------------------------------------------------------------------------------------------------
# Loss-masking spans


def labels_left_out(d: Data, split: str, start: int, count: int) -> np.ndarray | None:
    """Data.read()'s labels left out, or None where it leaves none out."""
    mask = d.read(split, start, count)[2]
    return mask if mask.any() else None


def docs_with_spans(rng, sizes: list[int], offset: int, vocab: int | None = None):
    """Documents whose tokens are their stream position plus offset (mod vocab, if given), and random spans [b, e)
    per document, some empty, some overlapping, some at a document's edges."""
    tokens = np.arange(sum(sizes)) + offset
    docs = [d.tolist() for d in np.split(tokens % vocab if vocab else tokens, np.cumsum(sizes)[:-1])]
    spans = [[tuple(sorted(rng.integers(0, size + 1, 2).tolist())) for _ in range(rng.integers(0, 4))]
             for size in sizes]
    return docs, spans


def spanned_data(tmp_path: Path, use: bool = True, vocab: int | None = None, length: int = 16) -> tuple[Data, set]:
    """A blend of an index of version 2 and a single file, both with spans; returns Data and the masked tokens."""
    rng = np.random.default_rng(0)
    (a, spans_a), (b, spans_b) = (docs_with_spans(rng, rng.integers(1, 40, 60).tolist(), o, vocab)
                                  for o in (0, 10_000))
    write_by_hand(tmp_path / "a", a, code=4, fmt="i", version=2, spans=[[(s, e - 1) for s, e in d] for d in spans_a])
    fast_llm_by_hand(tmp_path / "b.fast_llm_dataset", b, fmt="i", data_type="int32",
                     ranges={"loss_masking_spans": spans_b})
    path = write_json(tmp_path / "d.json", [{"prefix": "a", "weight": 1},
                                            {"prefix": "b.fast_llm_dataset", "weight": 2}])
    masked = {t for docs, spans in ((a, spans_a), (b, spans_b)) for doc, s in zip(docs, spans)
              for x, y in s for t in doc[x:y]}
    config = DataConfig(path=str(path), split=[8, 2, 0], sampling=SamplingConfig(use_loss_masking_spans=use))
    return Data(config, length, vocab or 20_000, seed=0), masked


def test_spans_become_ignored_labels_in_every_window(tmp_path):
    d, masked = spanned_data(tmp_path)
    assert d.warnings == []
    for split in ("train", "validation"):
        n = d.num_samples(split)
        tokens, ignored = d.samples(split, 0, 2 * n).numpy(), labels_left_out(d, split, 0, 2 * n)
        # Label j of a window is its token j + 1: ignored exactly when that token lies in a span of its document.
        expected = np.isin(tokens[:, 1:], list(masked))
        assert ignored.shape == (2 * n, 16) and ignored.any() and not ignored.all()
        assert (ignored == expected).all()
    loader = Loader(d, "train", 0, 4, 2)
    pairs, tokens = loader.next_batch(), d.samples("train", 0, 4)
    loader.close()
    labels = torch.where(torch.from_numpy(labels_left_out(d, "train", 0, 4)), data.IGNORE_INDEX, tokens[:, 1:])
    assert torch.equal(torch.cat([x for x, _, _ in pairs]), tokens[:, :-1])
    assert torch.equal(torch.cat([y for _, y, _ in pairs]), labels)


def test_spans_unused_are_said_once_and_change_nothing(tmp_path):
    d, _ = spanned_data(tmp_path, use=False)
    assert labels_left_out(d, "train", 0, 8) is None and len(d.warnings) == 1
    assert "2 of the 2 datasets" in d.warnings[0] and "data.sampling.use_loss_masking_spans: true" in d.warnings[0]
    stream_dataset(tmp_path, [10, 20, 30], name="plain")
    path = write_json(tmp_path / "p.json", [{"prefix": "plain", "weight": 1}])
    d = Data(DataConfig(path=str(path), sampling=SamplingConfig(use_loss_masking_spans=True)), 4, 100, 0)
    assert labels_left_out(d, "train", 0, 8) is None and "no dataset of" in d.warnings[0]


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_masked_labels_add_nothing_to_the_loss_or_its_gradients(impl):
    torch.manual_seed(0)
    model, _ = build_model()
    model.config.cross_entropy_impl = impl  # the twin, or the Triton kernel (interpreted on the CPU)
    inputs, labels = torch.randint(0, 101, (2, 24)), torch.randint(0, 101, (2, 24))
    ignored = torch.rand(2, 24) < 0.4
    loss = model(inputs, torch.where(ignored, data.IGNORE_INDEX, labels))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    # By hand: the cross-entropy of each kept label from the full logits, averaged over the kept labels only; the
    # masked labels' tokens appear nowhere.
    model.zero_grad()
    manual = -model(inputs).log_softmax(-1).gather(-1, labels[..., None])[..., 0][~ignored].mean()
    manual.backward()
    torch.testing.assert_close(loss, manual, atol=1e-5, rtol=1e-5)
    for ours, expected in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def learnable_with_spans(rng, n: int = 200):
    """test_train's kind of documents (runs of consecutive tokens mod 64, learnable), with random spans [b, e)."""
    docs = [[(s + i) % 64 for i in range(size)] for s, size in zip(rng.integers(0, 64, n), rng.integers(20, 60, n))]
    return docs, [[tuple(sorted(rng.integers(0, len(d) + 1, 2).tolist()))] for d in docs]


def write_format(folder: Path, case: str, rng) -> Path:
    """The data.path of a dataset in `case`'s format, built byte by byte."""
    folder.mkdir(parents=True)
    docs, spans = learnable_with_spans(rng)
    last = [[(b, e - 1) for b, e in s] for s in spans]
    if case.startswith("index"):
        extras = {"v2": dict(spans=last), "v3": dict(spans=last, preference=[((0, 1), (2, 3))] * len(docs)),
                  "Megatron": dict(index_length=120, tail=bytes(len(docs)))}[case.split()[1]]
        write_by_hand(folder / "x", docs, code=8, fmt="H", version=1 if "Megatron" in case else int(case[7]), **extras)
        return write_json(folder / "d.json", [{"prefix": "x"}])
    fast_llm_by_hand(folder / "x.fast_llm_dataset", docs, ranges={"loss_masking_spans": spans})
    if case == "single file":
        return yaml_file(folder / "fast_llm_config.yaml", {"config": {"type": "memmap", "path": "x.fast_llm_dataset"},
                                                           "metadata": {}})
    write_by_hand(folder / "y", docs[::-1], code=3, fmt="h", version=3, spans=last[::-1])
    yaml_file(folder / "inner.yaml", {"type": "memmap", "path": "y"})
    return yaml_file(folder / "d.yaml", {"type": "blended", "weights": [2, 1], "datasets": [
        {"type": "slice", "dataset": {"type": "memmap", "path": "x.fast_llm_dataset"}, "end": 0.8},
        {"type": "concatenated", "datasets": [
            {"type": "file", "path": "inner.yaml"},
            {"type": "slice", "dataset": {"type": "memmap", "path": "y"}, "begin": 0.5}]}]})


def run_train(tmp_path: Path, path: Path, *overrides: str) -> Path:
    """train.py on test_train's tiny model and `path`, its loss-masking spans used; returns the experiment folder."""
    exp = tmp_path / f"exp{len(list(tmp_path.glob('exp*')))}"
    config = tmp_path / f"{exp.name}.yaml"
    config.write_text(TRAIN_CONFIG.replace("DATA", str(path)).replace("EXP", str(exp)))
    assert train.main([str(config), "training.checkpoint.interval=null", "data.sampling.use_loss_masking_spans=true",
                       *overrides]) == 0
    return exp


@pytest.mark.parametrize("case", ["index v2 spans", "index v3 spans and preference", "index Megatron multimodal",
                                  "single file", "Fast-LLM YAML"])
def test_each_format_trains(tmp_path, case):
    path = write_format(tmp_path / "data", case, np.random.default_rng(0))
    loss = train_metrics(exp := run_train(tmp_path, path, "training.train_iters=3"), "loss")
    assert sorted(loss) == [1, 2, 3] and all(np.isfinite(list(loss.values())))
    assert list(train_metrics(exp, "val_loss")) == [3]


def test_step_loss_is_the_mean_over_labelled_tokens_however_the_batch_is_cut(tmp_path):
    path = write_format(tmp_path / "data", "index v2 spans", np.random.default_rng(1))
    once = "training.train_iters=1", "training.validation.interval=null", "training.test_iters=0"
    runs = [run_train(tmp_path, path, *once, f"batch.micro_batch_size={micro}") for micro in (1, 4)]
    (loss_1, loss_4), (norm_1, norm_4) = ([train_metrics(e, key)[1] for e in runs] for key in ("loss", "grad_norm"))
    # By hand: the batch's labelled tokens, scored by the model as train.py initializes it.
    config = schema.load_config(str(tmp_path / "exp0.yaml"), ["data.sampling.use_loss_masking_spans=true"])
    d = Data(config.data, 32, 64)  # data.sampling.seed, as train.py reads it
    tokens, ignored = d.samples("train", 0, 4), torch.from_numpy(labels_left_out(d, "train", 0, 4))
    assert 0 < ignored.sum() and len(set(ignored.sum(1).tolist())) > 1  # micro-batches of unequal labelled tokens
    torch.manual_seed(config.model.distributed.seed)
    with torch.device("meta"):
        model = Llama(config.model.base_model, 32)
    model.init_weights("cpu")
    expected = model(tokens[:, :-1], torch.where(ignored, data.IGNORE_INDEX, tokens[:, 1:])).item()
    assert loss_1 == pytest.approx(expected, rel=1e-5) and loss_4 == pytest.approx(expected, rel=1e-5)
    assert norm_1 == pytest.approx(norm_4, rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# prepare


def run_prepare(*args):
    return subprocess.run([sys.executable, str(ROOT / "prepare.py"), *map(str, args)],
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
    """Run `prepare` in this process (a subprocess costs a second of imports); return its one-line error message."""
    with pytest.raises(SystemExit) as exit_, contextlib.redirect_stderr(io.StringIO()) as stderr:
        prepare.main([*map(str, args)])
    err = stderr.getvalue()
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


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
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and not out.exists()


def test_prepare_parquet(demo, tmp_path, monkeypatch):
    import pyarrow  # requirements-test.txt installs it for this test
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"body": ["Good morrow.", "Farewell."]}), tmp_path / "a.parquet")
    assert "no column 'text'" in prepare_error("--input", tmp_path / "a.parquet", "--output", tmp_path / "out")
    prepare.main(["--input", str(tmp_path / "a.parquet"), "--text-field", "body", "--tokenizer",
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


def test_prepare_fast_llm_format(demo, tmp_path):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"Speech {i}: once more unto the breach."}) + "\n"
                                               for i in range(5)))
    args = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer", str(demo / "tokenizer.json"),
            "--workers", "1", "--shard-tokens", "30"]
    prepare.main([*args, "--output", str(tmp_path / "fl"), "--format", "fast_llm"])
    prepare.main([*args, "--output", str(tmp_path / "mm")])  # the default: .bin/.idx pairs and our JSON
    names = sorted(p.name for p in (tmp_path / "fl").iterdir())
    assert names == ["fast_llm_config.yaml", "shard_0.fast_llm_dataset", "shard_1.fast_llm_dataset",
                     "shard_2.fast_llm_dataset", "tokenizer.json"]
    spec = yaml.safe_load((tmp_path / "fl" / "fast_llm_config.yaml").read_text())
    shards = [tmp_path / "fl" / d["path"] for d in spec["config"]["datasets"]]
    assert spec.keys() == {"config", "metadata"} and spec["config"]["type"] == "blended"
    # What Fast-LLM's reader does, by hand: the big-endian offset of the JSON config, which names only parts that
    # every Fast-LLM with single files knows; each section between its markers, exactly as long as its config says.
    docs, weights = [], []
    for shard in shards:
        raw = shard.read_bytes()
        at = int.from_bytes(raw[25:33], "big")
        size = int.from_bytes(raw[at : at + 4], "big")
        config = json.loads(raw[at + 4 : at + 4 + size])
        assert raw[:25] == b"fast_llm_prepared_dataset" and at + 4 + size == len(raw)
        assert set(config) == {"type", "begin", "end", "tokens", "loss_masking_spans", "chosen_spans",
                               "rejected_spans"}
        tokens, n, t = config["tokens"], config["tokens"]["num_documents"], config["tokens"]["num_tokens"]
        assert tokens["data_type"] == "int16" and config["loss_masking_spans"] == {"type": "none"}
        for part, marker, inside in ((config, b"lm", tokens["end"] - tokens["begin"]),
                                     (tokens, b"token", 2 * t + 8 * (n + 1))):
            begin, end = part["begin"], part["end"]
            assert raw[begin:end].startswith(marker + b" begin") and raw[begin:end].endswith(marker + b" end")
            assert end - begin == len(marker) * 2 + 10 + inside
        ids = np.frombuffer(raw, np.int16, t, tokens["begin"] + 11)
        cumsum = np.frombuffer(raw, np.int64, n + 1, tokens["begin"] + 11 + 2 * t)
        docs += [ids[a:b].tolist() for a, b in zip(cumsum[:-1], cumsum[1:])]
        weights.append(t)
    assert spec["config"]["weights"] == weights and spec["metadata"]["num_tokens"] == sum(weights)
    ours = [MemmapDataset(tmp_path / "mm" / f"shard_{i}") for i in range(3)]
    assert docs == [ds.document(i).tolist() for ds in ours for i in range(ds.num_documents)] and len(docs) == 5
    d = Data(DataConfig(path=str(tmp_path / "fl" / "fast_llm_config.yaml"), split=[1, 0, 0]), 8, 4096, 0)
    assert d.tokenizer_path == tmp_path / "fl" / "tokenizer.json" and d.samples("train", 0, 2).shape == (2, 9)
