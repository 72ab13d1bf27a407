"""Token data for pretraining: the token file formats, dataset files, splits, blends, sampling and the loader.

`data.path` names a dataset file: our JSON (token files with weights), or Fast-LLM's dataset config YAML (blends,
slices and concatenations of token files, other YAMLs). Token files are PREFIX.idx + PREFIX.bin pairs (Megatron's index
version 1, Fast-LLM's 2 and 3) or Fast-LLM's single NAME.fast_llm_dataset (docs/formats.md). `data.split` cuts every
dataset into train / validation / test ranges of whole documents. Inside a split, a dataset's documents are read as one
stream of tokens, and samples are windows of `sequence_length + 1` tokens with stride `sequence_length` (consecutive
windows share one token, as in Megatron), so windows run across document boundaries. Each epoch of a split is a seeded
shuffle: which dataset a sample comes from (in proportion to the weights) and which window of that dataset. Everything
is a function of (seed, config, sequence_length), so a sample index always gives the same tokens, and a loader's only
state is how many samples it has consumed. With `data.sampling.use_loss_masking_spans`, labels inside a dataset's
loss-masking spans are left out of the loss. prepare.py writes these formats from text."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml


class DataError(Exception):
    """Bad input: the message says what was wrong, where (file, key) and what would fit."""


# --------------------------------------------------------------------------------------------------
# Token files. Every reader offers Data the same view of its documents, one stream of tokens in document
# order: `cumsum[i]` (where document i starts), `read(start, length)`, `has_spans` and `spans()` (the
# loss-masking spans as stream positions), `key()` (what identifies the files, for the sample-index cache).

MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")  # index version 1: magic, version, dtype code, documents n, document-index length
TOKEN_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
FLOAT_CODES = (6, 7)  # float32 and float64, numbered one way by Fast-LLM and the other by Megatron: never tokens
CODES = {np.dtype(t): code for code, t in TOKEN_DTYPES.items()}
FILE_MAGIC = b"fast_llm_prepared_dataset"  # a single file starts with it, then its config's offset (8 bytes)
DATASET_JSON, DATASET_YAML = "fast_llm_dataset.json", "fast_llm_config.yaml"  # the names prepare.py writes
IGNORE_INDEX = -100  # a label the loss leaves out (kernels.IGNORE_INDEX, F.cross_entropy's default)


def stream_spans(where, cumsum: np.ndarray, counts: np.ndarray, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Spans [begin, end) inside documents, `counts[i]` of them in document i, as [begin, end) positions in the
    stream of all documents: (m, 2) int64, sorted by begin. One that leaves its document is refused, naming it."""
    doc = np.repeat(np.arange(len(counts)), counts)
    size = cumsum[doc + 1] - cumsum[doc]
    if (bad := (begin < 0) | (begin > end) | (end > size)).any():  # empty ones ([b, b)) are allowed, and dropped
        i = int(np.argmax(bad))
        raise DataError(f"{where}: document {doc[i]} has a loss-masking span [{begin[i]}, {end[i]}) that is not "
                        f"inside its {size[i]} tokens; the file is corrupt.")
    spans = (np.stack([begin, end], 1) + cumsum[doc][:, None])[begin < end]
    return spans[np.argsort(spans[:, 0], kind="stable")]


class _Tokens:
    """What all readers share: no spans unless they say so (then checked on open, as stream positions), document
    access, the cache key of their files."""
    has_spans, files, _spans = False, (), np.zeros((0, 2), np.int64)

    def spans(self) -> np.ndarray:
        return self._spans

    def document(self, i: int) -> np.ndarray:
        return self.read(int(self.cumsum[i]), int(self.cumsum[i + 1] - self.cumsum[i]))

    def key(self) -> list:
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in self.files]


class MemmapDataset(_Tokens):
    """PREFIX.idx + PREFIX.bin, memory-mapped and validated on open: index version 1 (Megatron's, and Fast-LLM's until
    2025-02), 2 (adds loss-masking spans) or 3 (adds preference spans). Byte pointers find documents in .bin."""

    def __init__(self, prefix: str | Path):
        prefix = Path(prefix)
        # Fast-LLM replaces the prefix's suffix (wiki.v1 names wiki.idx), Megatron appends one: the first pair found.
        pairs = [[prefix.with_suffix(s) for s in (".idx", ".bin")], [Path(f"{prefix}{s}") for s in (".idx", ".bin")]]
        idx, bin_ = next((pair for pair in pairs if pair[0].is_file() and pair[1].is_file()), pairs[0])
        self.name, self.files = str(prefix), (idx, bin_)
        if missing := [path for path in (idx, bin_) if not path.is_file()]:
            raise DataError(f"{missing[0]}: file not found. A memmap dataset is a pair PREFIX.bin + PREFIX.idx "
                            f"(docs/formats.md); check the prefix, which is relative to the dataset file's folder.")
        idx_bytes, bin_bytes = idx.stat().st_size, bin_.stat().st_size
        raw = np.memmap(idx, np.uint8, "r") if idx_bytes else np.zeros(0, np.uint8)  # numpy can't map an empty file
        head = raw[: HEADER.size + 2].tobytes()
        magic, version = head[:9], int.from_bytes(head[9:17], "little")
        # Versions 2 and 3 add one flag byte each before the dtype code: loss-masking spans, preference spans.
        start = HEADER.size + version - 1 if version in (1, 2, 3) else HEADER.size  # the header's size
        if len(head) < start:
            raise DataError(f"{idx}: {idx_bytes} bytes, shorter than the {start}-byte header; the file is truncated.")
        if magic != MAGIC:
            raise DataError(f"{idx}: starts with {magic!r}, not the memmap magic {MAGIC!r} of Megatron/Fast-LLM.")
        if version not in (1, 2, 3):
            raise DataError(f"{idx}: index version {version}, not 1 (Megatron), 2 or 3 (Fast-LLM) (docs/formats.md).")
        self.has_spans, has_preference = version >= 2 and head[17] > 0, version >= 3 and head[18] > 0
        code, n, index_length = struct.unpack_from("<BQQ", head, start - 17)
        if code in FLOAT_CODES:
            raise DataError(f"{idx}: dtype code {code} is a float type (float32 or float64: Fast-LLM and Megatron "
                            f"number them differently); token ids are integers, so this is not a token dataset.")
        if code not in TOKEN_DTYPES:
            raise DataError(f"{idx}: unknown dtype code {code}, not one of {sorted(TOKEN_DTYPES)} (docs/formats.md).")
        # After sizes int32[n] and pointers int64[n]: span counts int32[n] and spans int32[sum, 2], then chosen
        # and rejected spans int32[n, 2] each, then the document index int64[index_length].
        at, preference = start + 12 * n, 16 * n * has_preference
        # Fast-LLM also writes the span counts (all 0) without setting the flag when no document has a span.
        counted = self.has_spans or (version >= 2 and idx_bytes == at + 4 * n + preference + 8 * index_length)
        counts = np.frombuffer(raw, np.int32, n, at) if counted and idx_bytes >= at + 4 * n else np.zeros(0, np.int32)
        spans_at = at + 4 * n * counted
        preference_at = spans_at + 8 * int(counts.sum(dtype=np.int64))
        expected = preference_at + preference + 8 * index_length
        # Megatron's multimodal index appends one int8 mode per sequence (0: text).
        modes = np.frombuffer(raw, np.int8, n, expected) if version == 1 and idx_bytes == expected + n else None
        if (counts < 0).any() or not (idx_bytes == expected or modes is not None):
            raise DataError(f"{idx}: {idx_bytes} bytes, but its header (version {version}, {n} documents, "
                            f"{'loss-masking spans, ' * self.has_spans}{'preference spans, ' * has_preference}"
                            f"document index of {index_length}) makes {expected}; the index is truncated or corrupt.")
        if modes is not None and modes.any():
            raise DataError(f"{idx}: a Megatron multimodal index: {np.count_nonzero(modes)} of its {n} sequences "
                            f"are not text (mode {modes[modes != 0][0]}); only token sequences can be trained on.")
        if n == 0:
            raise DataError(f"{idx}: the dataset has no documents; remove it from the dataset file.")
        self.dtype, self.sizes = np.dtype(TOKEN_DTYPES[code]), np.frombuffer(raw, np.int32, n, start)
        self.pointers = np.frombuffer(raw, np.int64, n, start + 4 * n)
        ends = self.pointers + self.sizes.astype(np.int64) * self.dtype.itemsize
        bad = (self.sizes < 0) | (self.pointers < 0) | (self.pointers % self.dtype.itemsize != 0) | (ends > bin_bytes)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{idx}: document {i} has {self.sizes[i]} tokens at byte {self.pointers[i]}, not inside "
                            f"{bin_} ({bin_bytes} bytes of {self.dtype}); the .idx and .bin do not belong together.")
        self.cumsum = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])  # stream offset of each document
        self.num_documents, self.num_tokens = int(n), int(self.cumsum[-1])
        if self.num_tokens == 0:
            raise DataError(f"{idx}: all {n} documents are empty; the dataset has no tokens.")
        self.tokens = np.memmap(bin_, self.dtype, "r", shape=(bin_bytes // self.dtype.itemsize,))
        # Every writer we know lays documents end to end in index order; then a window is one slice.
        self.contiguous = bool(np.array_equal(self.pointers[1:], ends[:-1]))
        if self.has_spans:  # stored as [begin, last]
            stored = np.frombuffer(raw, np.int32, (preference_at - spans_at) // 4, spans_at).reshape(-1, 2)
            self._spans = stream_spans(idx, self.cumsum, counts, stored[:, 0], stored[:, 1].astype(np.int64) + 1)
        # Read, not used (they are for preference training): chosen and rejected [begin, last] of each document.
        self.preference = np.frombuffer(raw, np.int32, 4 * n, preference_at).reshape(2, n, 2) if preference else None

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens start .. start+length-1 of the stream of all documents in order."""
        if self.contiguous:
            first = int(self.pointers[0]) // self.dtype.itemsize + start
            return self.tokens[first : first + length]
        position = np.arange(start, start + length)
        doc = np.searchsorted(self.cumsum, position, side="right") - 1
        return self.tokens[self.pointers[doc] // self.dtype.itemsize + position - self.cumsum[doc]]


class FileDataset(_Tokens):
    """NAME.fast_llm_dataset, Fast-LLM's single file since v0.4: sections between ASCII markers, located by a JSON
    config at the end. The token section (tokens, then n + 1 cumulative sizes) starts at byte 41, unaligned, so
    arrays are views at byte offsets of one memory map; nothing is read whole. Image patches are refused."""

    def __init__(self, path: Path):
        self.name, self.files = str(path), (path,)
        self._raw = raw = np.memmap(path, np.uint8, "r") if path.stat().st_size else np.zeros(0, np.uint8)
        if raw[: len(FILE_MAGIC)].tobytes() != FILE_MAGIC:
            raise DataError(f"{path}: starts with {raw[:25].tobytes()!r}, not {FILE_MAGIC!r}; not a Fast-LLM dataset.")
        at = int.from_bytes(raw[len(FILE_MAGIC) : len(FILE_MAGIC) + 8], "big")
        blob = raw[at + 4 : at + 4 + int.from_bytes(raw[at : at + 4], "big")].tobytes()
        try:
            config = json.loads(blob)
        except (ValueError, UnicodeDecodeError):
            config = None
        kind = config.get("type") if isinstance(config, dict) else None
        if kind != "language_model":
            raise DataError(f"{path}: no language-model config at byte {at}, where its header points; the file is "
                            f"truncated, corrupt, or of another kind ({kind or blob[:40]!r}).")
        if (config.get("image_patches") or {}).get("type", "none") != "none":
            raise DataError(f"{path}: holds image patches (a multimodal dataset); only text datasets are read.")
        tokens = config.get("tokens") or {}
        name = str(tokens.get("data_type")).rsplit(".", 1)[-1]  # also "DataType.int16"
        if name not in ("uint8", "int8", "int16", "uint16", "int32", "int64"):
            raise DataError(f"{path}: token data type {tokens.get('data_type')!r}; token ids are integers.")
        self.dtype, (n, t) = np.dtype(name), self._counts(tokens, "num_documents", "num_tokens")
        at = self._section(tokens, b"token", t * self.dtype.itemsize + 8 * (n + 1))
        self.tokens = np.frombuffer(raw, self.dtype, t, at)
        self.cumsum = np.frombuffer(raw, np.int64, n + 1, at + t * self.dtype.itemsize)
        if n == 0 or t == 0:
            raise DataError(f"{path}: the dataset has no {'tokens' if n else 'documents'}; remove it.")
        if self.cumsum[0] != 0 or self.cumsum[-1] != t or (np.diff(self.cumsum) < 0).any():
            raise DataError(f"{path}: its document sizes do not add up to its {t} tokens; the file is corrupt.")
        self.num_documents, self.num_tokens = n, t
        spans = config.get("loss_masking_spans") or {}
        self.has_spans = spans.get("type") == "range"
        if self.has_spans:  # ranges [begin, end) int32[m, 2], then the cumulative count of each document's
            (m,) = self._counts(spans, "num_ranges")
            at = self._section(spans, b"range", 8 * m + 4 * (n + 1))
            ranges = np.frombuffer(raw, np.int32, 2 * m, at).reshape(-1, 2)
            counts = np.frombuffer(raw, np.int32, n + 1, at + 8 * m)
            if counts[0] != 0 or counts[-1] != m or (np.diff(counts) < 0).any():
                raise DataError(f"{path}: its span counts do not add up to its {m} loss-masking spans; it is corrupt.")
            self._spans = stream_spans(path, self.cumsum, np.diff(counts), *ranges.T)

    def _counts(self, part: dict, *keys: str) -> list[int]:
        values = [part.get(key) for key in keys]
        if not all(isinstance(v, int) and v >= 0 for v in values):
            raise DataError(f"{self.name}: its config gives {dict(zip(keys, values))}; expected counts.")
        return values

    def _section(self, part: dict, marker: bytes, size: int) -> int:
        """Where a section's data starts, once its offsets are checked against its size and markers."""
        begin, end, raw = part.get("begin"), part.get("end"), self._raw
        head, tail = marker + b" begin", marker + b" end"
        if not (isinstance(begin, int) and 0 <= begin and end == begin + len(head) + size + len(tail) <= len(raw)
                and raw[begin : begin + len(head)].tobytes() == head and raw[end - len(tail) : end].tobytes() == tail):
            raise DataError(f"{self.name}: its {marker.decode()} section (bytes {begin}..{end}) does not hold {size} "
                            f"bytes between {head!r} and {tail!r}; the file is truncated or corrupt.")
        return begin + len(head)

    def read(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start : start + length]


class Concatenation(_Tokens):
    """Documents first..last-1 of one or more datasets, one after another, as one stream: Fast-LLM's `slice` and
    `concatenated`. Pieces that are concatenations are opened up, so a read goes straight to the files."""

    def __init__(self, pieces: list[tuple[_Tokens, int, int]], name: str):
        self.name, self.pieces = name, []
        for dataset, first, last in pieces:
            seen = 0  # documents of `dataset` before its current piece
            inside = dataset.pieces if isinstance(dataset, Concatenation) else [(dataset, 0, dataset.num_documents)]
            for inner, a, b in inside:
                lo, hi = a + max(first - seen, 0), min(b, a + last - seen)
                self.pieces += [(inner, lo, hi)] if lo < hi else []
                seen += b - a
        self.starts = np.cumsum([0] + [int(d.cumsum[b] - d.cumsum[a]) for d, a, b in self.pieces])  # in the stream
        self.cumsum = np.concatenate([[0], *(d.cumsum[a + 1 : b + 1] - d.cumsum[a] + s
                                             for (d, a, b), s in zip(self.pieces, self.starts.tolist()))])
        self.num_documents, self.num_tokens = len(self.cumsum) - 1, int(self.cumsum[-1])
        self.has_spans = any(d.has_spans for d, _, _ in self.pieces)

    def read(self, start: int, length: int) -> np.ndarray:
        out, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            (d, a, _), count = self.pieces[i], min(length, int(self.starts[i + 1]) - start)
            out.append(d.read(int(d.cumsum[a]) + start - int(self.starts[i]), count))
            start, length, i = start + count, length - count, i + 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def spans(self) -> np.ndarray:
        out = [np.zeros((0, 2), np.int64)]
        for (d, a, b), s in zip(self.pieces, self.starts.tolist()):
            if d.has_spans:  # spans never cross documents, so those of documents a..b-1 lie whole inside
                lo, hi, spans = d.cumsum[a], d.cumsum[b], d.spans()
                out.append(spans[(spans[:, 0] >= lo) & (spans[:, 1] <= hi)] - lo + s)
        return np.concatenate(out)

    def key(self) -> list:
        return [[d.key(), a, b] for d, a, b in self.pieces]


def tokenizer_ids(path: Path) -> dict[str, int]:
    """The ids of a Hugging Face tokenizer.json's tokens: its model's vocabulary (Unigram's: a list), added ones."""
    try:
        tokenizer = json.loads(path.read_text())
        vocab = (tokenizer.get("model") or {}).get("vocab") or {}
        ids = {token[0]: i for i, token in enumerate(vocab)} if isinstance(vocab, list) else dict(vocab)
        return ids | {t["content"]: t["id"] for t in tokenizer.get("added_tokens") or []}
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a readable tokenizer.json ({e}).") from None


def open_dataset(path: Path) -> _Tokens:
    """A token-file path as Fast-LLM's `memmap` reads it: a single file, or else a prefix of a .idx/.bin pair."""
    return FileDataset(path) if path.is_file() and path.suffix not in (".idx", ".bin") else MemmapDataset(path)


def _positive(weight) -> bool:
    return not isinstance(weight, bool) and isinstance(weight, (int, float)) and 0 < weight < float("inf")


def read_datasets(path: Path) -> list[tuple[_Tokens, float]]:
    """The datasets of data.path, validated, with their blend weights: a dataset JSON or Fast-LLM's YAML."""
    if path.is_dir():
        inside = [path / n for n in (DATASET_JSON, DATASET_YAML) if (path / n).is_file()]
        raise DataError(f"data.path: {path} is a folder; name the dataset file in it"
                        + (f": {inside[0]}" if inside else f" ({DATASET_JSON} or {DATASET_YAML})."))
    if not path.is_file():
        raise DataError(f"data.path: {path} not found; `python prepare.py --output DIR` writes "
                        f"DIR/{DATASET_JSON} (or DIR/{DATASET_YAML} with --format fast_llm).")
    return read_dataset_config(path) if path.suffix in (".yaml", ".yml") else read_dataset_json(path)


def read_dataset_json(path: Path) -> list[tuple[_Tokens, float]]:
    """Our dataset JSON: {"datasets": [{"prefix", "weight", "num_documents", "num_tokens"}, ...]}."""
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"data.path: {path} is not valid JSON ({e}); a Fast-LLM dataset YAML ends in .yaml.") from None
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f'data.path: {path} has no "datasets" list; expected {{"datasets": [{{"prefix": ..., '
                        f'"weight": ...}}, ...]}}.')
    datasets = []
    for i, entry in enumerate(entries):
        where = f"{path}, datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("prefix"), str):
            raise DataError(f'{where}: no "prefix"; each dataset needs "prefix" (its files minus .bin/.idx, or a '
                            f".fast_llm_dataset file, relative to the JSON).")
        weight = entry.get("weight", 1.0 if len(entries) == 1 else None)
        if not _positive(weight):
            raise DataError(f'{where}: "weight" is {weight!r}; each dataset of a blend needs a positive number '
                            f"(its token share, say).")
        dataset = open_dataset(path.parent / entry["prefix"])
        for key, actual in (("num_documents", dataset.num_documents), ("num_tokens", dataset.num_tokens)):
            if key in entry and entry[key] != actual:
                raise DataError(f'{where}: "{key}" is {entry[key]} but {dataset.name} holds {actual}; the JSON '
                                f"does not describe these files (prepare them again, or fix the JSON).")
        datasets.append((dataset, float(weight)))
    return datasets


REFUSED_TYPES = {"random": "random tokens; data.format: random gives those", "fim": "fill-in-the-middle",
                 "streaming": "a Redis stream"}


def yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what a YAML parse error is, as a message goes on: " at line 3, column 1: expected ..."."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {getattr(e, 'problem', None) or e}"


def read_dataset_config(path: Path, depth: int = 0) -> list[tuple[_Tokens, float]]:
    """Fast-LLM's dataset config YAML, {config: DATASET, metadata: ...} since v0.4 and the bare DATASET before:
    the token datasets it blends, with their weights. Paths inside are relative to the YAML's folder."""
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable file ({e}).") from None
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML{yaml_problem(e)}.") from None
    except RecursionError:  # YAML nested thousands deep
        raise DataError(f"{path}: datasets nested too deep to read.") from None
    wrapped = isinstance(spec, dict) and spec.keys() == {"config", "metadata"}
    try:
        return _resolve(spec["config"] if wrapped else spec, path, "config" if wrapped else "(top level)", depth)
    except RecursionError:  # a dataset that holds itself (a YAML alias), or nested thousands deep
        raise DataError(f"{path}: a dataset holds itself (a YAML alias of an enclosing one?) or is nested too "
                        "deep to read.") from None


def _resolve(spec, file: Path, where: str, depth: int) -> list[tuple[_Tokens, float]]:
    """The DATASET at key `where` of `file`: [(dataset, weight), ...], a single one of weight 1 unless a blend."""
    here, kind = f"{file}, {where}", spec.get("type") if isinstance(spec, dict) else None
    if kind in REFUSED_TYPES:
        raise DataError(f"{here}: dataset type {kind!r} ({REFUSED_TYPES[kind]}) is not read here; give token files "
                        f"(type memmap) and blends, slices or concatenations of them.")
    if kind in ("memmap", "file"):
        if not isinstance(spec.get("path"), str):
            raise DataError(f'{here}: no "path"; a {kind} dataset names its file, relative to {file.parent}.')
        if kind == "memmap":
            return [(open_dataset(file.parent / spec["path"]), 1.0)]
        if depth >= 16:
            raise DataError(f"{here}: dataset files nested over 16 deep; does {spec['path']} include itself?")
        return read_dataset_config(file.parent / spec["path"], depth + 1)
    if kind == "blended":
        datasets, weights = spec.get("datasets"), spec.get("weights")
        if not (isinstance(datasets, list) and isinstance(weights, list) and datasets and len(datasets) == len(weights)
                and all(map(_positive, weights))):
            raise DataError(f'{here}: a blend needs "datasets" and as many positive "weights" (token counts, say); '
                            f"got {datasets!r:.80} and {weights!r:.80}.")
        # A blend of blends is one blend: the weights of an inner blend share its weight in the outer one.
        parts = [_resolve(inner, file, f"{where}.datasets[{i}]", depth) for i, inner in enumerate(datasets)]
        return [(d, weight * w / sum(w for _, w in part)) for weight, part in zip(weights, parts) for d, w in part]
    if kind == "concatenated" and isinstance(spec.get("datasets"), list) and spec["datasets"]:
        datasets = [_one(inner, file, f"{where}.datasets[{i}]", depth) for i, inner in enumerate(spec["datasets"])]
        return [(Concatenation([(d, 0, d.num_documents) for d in datasets], here), 1.0)]
    if kind == "slice":
        dataset = _one(spec.get("dataset"), file, f"{where}.dataset", depth)
        begin, end = spec.get("begin", 0), spec.get("end", 1)
        if not (all(type(x) in (int, float) for x in (begin, end)) and 0 <= begin <= end <= 1):  # a bool is no number
            raise DataError(f"{here}: slice from {begin!r} to {end!r}; begin and end are fractions of the documents, "
                            f"0 <= begin <= end <= 1.")
        n = dataset.num_documents  # Fast-LLM rounds the fractions to whole documents the same way
        return [(Concatenation([(dataset, round(begin * n), round(end * n))], here), 1.0)]
    raise DataError(f"{here}: dataset type {kind!r}; the types read are memmap, blended, slice, concatenated (of a "
                    f"non-empty list) and file, Fast-LLM's datasets of tokens.")


def _one(spec, file: Path, where: str, depth: int) -> _Tokens:
    """The DATASET at `where` of `file`, which a slice or a concatenation takes: one of documents, not a blend."""
    parts = _resolve(spec, file, where, depth)
    if len(parts) != 1:
        raise DataError(f"{file}, {where}: a blend, where Fast-LLM takes documents (memmap, slice, concatenated, or a "
                        f"file of one).")
    return parts[0][0]


# --------------------------------------------------------------------------------------------------
# Splits, blends and the sample index.

SPLITS = ("train", "validation", "test")
SHUFFLES = ("epoch", "skip_first_epoch", "full", "disabled")  # Fast-LLM's values of data.sampling.shuffle


@dataclass
class SamplingConfig:
    use_loss_masking_spans: bool = False  # leave labels inside a dataset's loss-masking spans out of the loss
    ignore_document_starts: bool = False  # (ours; Fast-LLM v0.4 always) no label predicts a document's first token
    shuffle: str = "epoch"  # documents reshuffled every epoch; skip_first_epoch, full (all epochs at once), disabled
    seed: int = 784569  # the document orders and the blend (Fast-LLM's default)


@dataclass
class DataConfig:
    format: str = "file"  # "file": a dataset file (docs/formats.md); "random" (ours): random tokens, no files
    path: str | None = None  # our dataset JSON or Fast-LLM's dataset YAML (for "file"); paths inside are relative
    split: list[float] = field(default_factory=lambda: [969, 30, 1])  # train / validation / test weights, normalized
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # what a sample holds besides its tokens

    def errors(self) -> list[str]:
        """What is wrong with these values (train.py reports them with the rest of the config)."""
        return [message for failed, message in [
            (self.format not in ("file", "random"),
             f"data.format: {self.format!r} is not one of 'file' (a dataset JSON) or 'random'."),
            (self.format == "file" and self.path is None,
             "data.path: required when data.format is 'file': the dataset JSON that `python prepare.py` wrote (e.g. "
             "data/demo/fast_llm_dataset.json) or a Fast-LLM dataset YAML."),
            (self.sampling.shuffle not in SHUFFLES, f"data.sampling.shuffle: {self.sampling.shuffle!r} is not one of "
             f"{', '.join(SHUFFLES)}."),
            (len(self.split) != 3 or not all(0 <= w < float("inf") for w in self.split) or sum(self.split) <= 0,
             f"data.split: {self.split} must be three non-negative weights (train, validation, test) with a "
             f"positive sum, e.g. [969, 30, 1]."),
        ] if failed]


def split_boundaries(num_documents: int, split) -> np.ndarray:
    """Document boundaries [0, a, b, n]: split s is documents boundaries[s] .. boundaries[s+1]-1."""
    edges = np.round(np.cumsum([0.0, *split]) / sum(split) * num_documents).astype(np.int64)
    edges[-1] = num_documents  # no rounding slip at the end
    return edges


class _Part:
    """One dataset's share of one split, read as an endless stream of rounds: each round its documents in an order
    that `shuffle` decides (a new permutation a round; `full` permutes `epochs` copies at once), end to end."""

    def __init__(self, dataset: _Tokens, first: int, last: int, weight: float, spans, shuffle: str, seed: list[int],
                 epochs: int):
        self.dataset, self.first, self.weight, self.spans = dataset, first, weight, spans
        self.shuffle, self.seed = shuffle, seed
        self.sizes = np.diff(dataset.cumsum[first : last + 1])
        self.n, self.epochs = last - first, epochs if shuffle == "full" else 1
        self.round_tokens = int(self.sizes.sum()) * self.epochs
        self._round = (None, None, None)  # the last round read: its number, document order, their starts

    def order(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Round r's documents (numbers within the part) and where each starts in the round."""
        cached = self._round  # read once: another loader's thread may replace it
        if cached[0] != r:
            if self.shuffle == "disabled" or self.shuffle == "skip_first_epoch" and r == 0:
                order = np.arange(self.n)
            else:
                order = np.random.default_rng([*self.seed, r]).permutation(self.n * self.epochs) % self.n
            self._round = cached = (r, order, np.concatenate([[0], np.cumsum(self.sizes[order])]))
        return cached[1:]

    def pieces(self, position: int, length: int) -> list[tuple[int, int, int]]:
        """(document in the dataset, its first token, tokens) for the stream's tokens position .. position+length-1."""
        out = []
        r, within = divmod(position, self.round_tokens)
        order, starts = self.order(r)
        i = int(np.searchsorted(starts, within, side="right")) - 1
        while length > 0:
            if i == len(order):
                (order, starts), r, i = self.order(r + 1), r + 1, 0
            doc, begin = int(order[i]), within - int(starts[i]) if not out else 0
            take = min(length, int(self.sizes[doc]) - begin)
            out.append((self.first + doc, begin, take))
            length, i = length - take, i + 1
        return out


class Data:
    """The samples of each split of `data:` (the module docstring says how they are drawn). vocab_size is the model's:
    random tokens are drawn below it, file tokens at or above it are an error. `seed` replaces data.sampling.seed
    (tests). `horizon`: the samples the run reads of each split, which `full` shuffles over. cache_dir keeps each
    token file's scanned range (train.py: the experiment's cache/)."""

    def __init__(self, config: DataConfig, sequence_length: int, vocab_size: int, seed: int | None = None,
                 cache_dir: str | Path | None = None, horizon: dict[str, int] | None = None):
        if errors := config.errors():
            raise DataError(" ".join(errors))
        self.config, self.sequence_length, self.vocab_size = config, sequence_length, vocab_size
        self.seed = (config.sampling.seed if seed is None else seed) % 2**63  # numpy seeds are non-negative
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.tokenizer_path: Path | None = None
        self._blocks: dict[str, tuple] = {}  # per split, the last block of the blend read
        self.warnings: list[str] = []  # for the run's log: what the data holds that this run leaves unused
        self.blend: list[list] = []  # [name, tokens, share of the samples] of each dataset read
        if config.format == "random":
            return
        path = Path(config.path)
        datasets = read_datasets(path)
        self.tokenizer_path = path.parent / "tokenizer.json" if (path.parent / "tokenizer.json").is_file() else None
        use_spans, spanned = config.sampling.use_loss_masking_spans, [d for d, _ in datasets if d.has_spans]
        if spanned and not use_spans:
            self.warnings.append(f"data.path: {len(spanned)} of the {len(datasets)} datasets of {path} have "
                                 f"loss-masking spans ({spanned[0].name}, ...); they are ignored and every token is "
                                 f"trained on; set data.sampling.use_loss_masking_spans: true to leave them out.")
        if use_spans and not spanned:
            self.warnings.append(f"data.sampling.use_loss_masking_spans: no dataset of {path} has loss-masking "
                                 f"spans; every token is trained on.")
        self._parts: dict[str, list[_Part]] = {s: [] for s in SPLITS}
        if (total := sum(weight for _, weight in datasets)) == float("inf"):
            raise DataError(f"data.path: the weights of {path}'s blend add up past a float's range; scale them down.")
        self.blend = [[d.name, int(d.num_tokens), round(weight / total, 6)] for d, weight in datasets]
        self._empty: dict[str, list[str]] = {s: [] for s in SPLITS}  # datasets with no document in a split
        for d, (dataset, weight) in enumerate(datasets):
            spans = dataset.spans() if use_spans and dataset.has_spans else None
            edges = split_boundaries(dataset.num_documents, config.split)
            for s, name in enumerate(SPLITS):
                tokens = int(dataset.cumsum[edges[s + 1]] - dataset.cumsum[edges[s]])
                # `full` permutes at once the epochs the run reads of this part (at least one).
                needed = (horizon or {}).get(name, 0) * weight / total * sequence_length
                epochs = max(1, -(-int(needed) // max(tokens, 1)))
                if tokens:
                    self._parts[name].append(_Part(dataset, int(edges[s]), int(edges[s + 1]), weight, spans,
                                                   config.sampling.shuffle, [self.seed, s, 1 + d], epochs))
                else:
                    self._empty[name].append(dataset.name)
        if not self._parts["train"] or self._empty["train"]:
            raise DataError(f"data.path: {path}: the train split ({config.split[0]} of {config.split}) holds no "
                            f"document of {', '.join(self._empty['train'])}; use more data or a larger train weight.")
        self._ranges = self._token_ranges(path, datasets)  # written with the first samples: the run may be refused

    def _token_ranges(self, path: Path, datasets) -> dict[str, list[int]]:
        """Refuse tokens outside the model's vocabulary before anything is written: a tokenizer.json beside the
        dataset file that is larger, or a token file whose smallest or largest token is out of range. A file
        whose dtype can't hold vocab_size needs no look; another is scanned once and its range is cached."""
        size = 1 + max(tokenizer_ids(self.tokenizer_path).values(), default=-1) if self.tokenizer_path else 0
        if size > self.vocab_size:  # a tokenizer's ids are 0 .. size-1
            raise DataError(f"data.path: the tokenizer beside {path} ({self.tokenizer_path}) has {size} tokens, "
                            f"more than model.base_model.vocab_size {self.vocab_size}; set that to {size} or more.")
        ranges = {}
        leaves = [p[0] for d, _ in datasets for p in getattr(d, "pieces", [(d,)])]  # pieces are never concatenations
        for leaf in {id(d): d for d in leaves}.values():
            if leaf.dtype.kind == "u" and np.iinfo(leaf.dtype).max < self.vocab_size:
                continue
            key = hashlib.sha256(json.dumps(leaf.key()).encode()).hexdigest()[:16]
            cached = self.cache_dir / f"tokens-{key}.json" if self.cache_dir else None
            try:
                low, high = json.loads(cached.read_text()) if cached else None
            except (OSError, ValueError, TypeError):  # not scanned yet, or a damaged cache entry: scan
                low = high = 0
                for i in range(0, leaf.num_tokens, 2**24):  # in chunks: a scattered file's reads are copies
                    chunk = leaf.read(i, min(2**24, leaf.num_tokens - i))
                    low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
                ranges[key] = [low, high]
            if low < 0 or high >= self.vocab_size:
                raise DataError(f"data.path: {leaf.name} holds token {high if high >= self.vocab_size else low}, "
                                f"outside the model's vocabulary 0..{self.vocab_size - 1}; set "
                                f"model.base_model.vocab_size to the tokenizer's size.")
        return ranges  # scanned here; written into cache_dir with the first sample index

    def num_samples(self, split: str) -> int:
        """Samples in one epoch of the split (its tokens over sequence_length, at least one per dataset); 0 for a split
        that a dataset has no document of; "random" data has no epochs and reports 2**62."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        if self.config.format == "random":
            return 2**62
        return 0 if self._empty[split] else sum(max(1, p.round_tokens // p.epochs // self.sequence_length)
                                                for p in self._parts[split])

    def samples(self, split: str, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Samples start .. start+count-1 of the split's endless stream: (count, sequence_length + 1) int64 tokens."""
        return self.read(split, start, count, out)[0]

    def read(self, split: str, start: int, count: int, out: torch.Tensor | None = None):
        """Samples start .. start+count-1 of the split's endless stream: their tokens (into `out`, if given: the
        loader passes pinned memory), each token's document in its sample (count, sequence_length + 1) int32, and
        which labels the loss leaves out (count, sequence_length) bool: those in loss-masking spans in use, and with
        ignore_document_starts those of a document's first token (label j of a sample is its token j + 1)."""
        length = self.sequence_length + 1
        out = torch.empty((count, length), dtype=torch.int64) if out is None else out
        tokens, documents, ignored = out.numpy(), np.zeros((count, length), np.int32), np.zeros((count, length), bool)
        if self.config.format == "random":
            for k in range(count):
                tokens[k] = np.random.default_rng([self.seed, SPLITS.index(split), start + k]).integers(
                    0, self.vocab_size, length)
            return out, documents, ignored[:, 1:]
        parts, starts = self._parts[split], self.config.sampling.ignore_document_starts
        for k, (p, j) in enumerate(zip(*self._sources(split, start, count))):
            part, at = parts[p], 0
            for i, (doc, begin, take) in enumerate(part.pieces(j * self.sequence_length, length)):
                first = int(part.dataset.cumsum[doc])  # the document's first token in the dataset's stream
                tokens[k, at : at + take] = part.dataset.read(first + begin, take)  # in the vocabulary: _token_ranges
                documents[k, at : at + take] = i
                ignored[k, at] = starts and begin == 0 and at > 0
                if part.spans is not None:  # spans are [begin, end) stream positions sorted by begin
                    lo, hi = np.searchsorted(part.spans[:, 0], [first, int(part.dataset.cumsum[doc + 1])])
                    for b, e in (part.spans[lo:hi] - first - begin).clip(0, take).tolist():
                        ignored[k, at + b : at + e] = True
                at += take
        if self._ranges and self.cache_dir:  # each token file's scanned [low, high], once the run reads
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for key, bounds in self._ranges.items():  # temp + rename: a reader never sees half a file
                tmp = self.cache_dir / f"tokens-{key}.tmp{os.getpid()}.{threading.get_ident()}"
                tmp.write_bytes(json.dumps(bounds).encode())
                os.replace(tmp, self.cache_dir / f"tokens-{key}.json")
        self._ranges = {}
        return out, documents, ignored[:, 1:]

    def _sources(self, split: str, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """For samples start .. start+count-1: the part each is read from and its number in that part's stream. The
        split's stream is cut into blocks of num_samples(split) samples; in each, every part has its share of them by
        its weight (a part of fewer tokens than a sample too, repeating its documents), in a seeded order."""
        n = self.num_samples(split)
        if n == 0:
            raise DataError(f"data.split: the {split} split ({self.config.split}) holds no document of "
                            f"{', '.join(self._empty[split]) or self.config.path}; give it a larger weight, use more "
                            f"data, or turn off what reads it.")
        blocks, within = np.divmod(np.arange(start, start + count), n)
        part, local = np.empty(count, np.int64), np.empty(count, np.int64)
        for b in np.unique(blocks).tolist():
            if self._blocks.get(split, (None,))[0] != b:
                counts = np.diff(split_boundaries(n, [p.weight for p in self._parts[split]]))
                order = np.repeat(np.arange(len(counts)), counts)
                np.random.default_rng([self.seed, SPLITS.index(split), 0, b]).shuffle(order)
                rank = np.empty(n, np.int64)  # how many samples of its part come before it in the block
                by_part = np.argsort(order, kind="stable")
                rank[by_part] = np.arange(n) - np.concatenate([[0], np.cumsum(counts)])[order[by_part]]
                self._blocks[split] = (b, order, b * counts[order] + rank)
            _, order, number = self._blocks[split]  # read once: another loader's thread may replace it
            hit = blocks == b
            part[hit], local[hit] = order[within[hit]], number[within[hit]]
        return part, local


# --------------------------------------------------------------------------------------------------
# Loader: per-rank batches, read one step ahead on a background thread.

class Loader:
    """Per-rank batches of one split's stream. Its whole state is `consumed_samples` (global, over all ranks).

    Global samples [consumed, consumed + batch_size) are cut into world_size contiguous equal parts; rank r
    reads part r, so ranks read disjoint samples and a resume on any number of ranks continues the same
    stream. The next batch is read on a thread while the current step runs; on CUDA it lands in pinned
    memory and is copied without blocking. Labels inside loss-masking spans in use are IGNORE_INDEX."""

    def __init__(self, data: Data, split: str, consumed_samples: int, batch_size: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu", documents: bool = False):
        self.per_rank, rest = divmod(batch_size, world_size)
        if rest or self.per_rank % micro_batch_size:
            raise DataError(f"batch.batch_size: {batch_size} sequences do not split into {world_size} ranks of "
                            f"micro-batches of {micro_batch_size}; use a multiple of {world_size * micro_batch_size}.")
        self.data, self.split, self.consumed_samples, self.rank = data, split, consumed_samples, rank
        self.batch_size, self.micro_batch_size, self.device = batch_size, micro_batch_size, torch.device(device)
        self.documents = documents  # hand each token's document to the model (attention within documents)
        # One reader thread, kept for the loader's life: starting a thread per batch would make each step
        # wait for the new thread to hand back the GIL. At exit or on close() it ends (never a hang).
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"loader-{split}")
        self._ahead: tuple[int, concurrent.futures.Future] | None = None  # the next batch, being read

    def _read(self, start: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        out = torch.empty((self.per_rank, self.data.sequence_length + 1), dtype=torch.int64,
                          pin_memory=self.device.type == "cuda")
        return self.data.read(self.split, start + self.rank * self.per_rank, self.per_rank, out=out)

    def next_batch(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """This rank's micro-batches of the next global batch: (inputs, labels, documents), labels the inputs' next
        tokens, documents each input's document in its sample (or None when documents attend to each other)."""
        start, ahead, self._ahead = self.consumed_samples, self._ahead, None
        # The batch read ahead is used only if nobody moved consumed_samples since; result() re-raises.
        tokens, documents, ignored = ahead[1].result() if ahead and ahead[0] == start else self._read(start)
        tokens = tokens.to(self.device, non_blocking=True)
        labels = tokens[:, 1:].masked_fill(torch.from_numpy(ignored).to(self.device), IGNORE_INDEX)
        documents = torch.from_numpy(documents[:, :-1]).to(self.device) if self.documents else None
        micro = [x.split(self.micro_batch_size) for x in (tokens[:, :-1], labels)]
        batch = list(zip(*micro, documents.split(self.micro_batch_size) if self.documents else [None] * len(micro[0])))
        # The next read starts last: its thread holds the GIL for long stretches that this one would wait out.
        self.consumed_samples = start + self.batch_size
        self._ahead = (self.consumed_samples, self._reader.submit(self._read, self.consumed_samples))
        return batch

    def close(self):
        self._reader.shutdown(wait=True)
        self._ahead = None

