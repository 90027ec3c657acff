"""The corpus and the tokenizer: where the documents come from, their split, and their ids.

Sources: ``builtin`` (the standard library's own source files, present in every Python install, so
the default run needs no network), ``hub`` (``datasets.load_dataset``), ``local`` (text, JSON lines
or parquet files) and ``disk`` (``datasets.load_from_disk``). Documents are split into train and
validation by a hash of their text, so the split is the same on every machine and every run.

The tokenizer is ``bpe`` (trained on the train split and cached), ``bytes``, or any
``AutoTokenizer``; :mod:`dsinstab.run.data` packs the ids into blocks.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import socket
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from filelock import FileLock, Timeout

from dsinstab.run.config import ConfigError, DatasetConfig

EOS = "<|endoftext|>"
WHERE = "configs/dataset.yaml"
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces of at most this many characters

datasets.disable_progress_bars()

# ---------------------------------------------------------------------------------------------
# The corpus


@functools.cache
def _stdlib_files() -> list[Path]:
    """Every non-test source file of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
    files = [f for f in root.rglob("*.py") if not skip.intersection(f.relative_to(root).parts)]
    return sorted(files, key=lambda f: str(f.relative_to(root)))


def _local_files(pattern: str) -> list[str]:
    p = Path(pattern).expanduser()
    if p.is_dir():
        return [str(f) for f in sorted(p.rglob("*")) if f.suffix in LOCAL_BUILDERS]
    return sorted(glob.glob(str(p)))


def _content_stamp(files: list[str]) -> str:
    """Names relative to their common folder, sizes and three 4 KiB samples of each file.

    Unlike absolute paths and modification times this is the same on every node that holds a copy
    of the corpus, so node-local caches agree on the key. An edit that keeps a file's size and
    misses all three samples goes unnoticed; change the file name or the size to force a rebuild.
    """
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    stamp = []
    for f in files:
        size = os.path.getsize(f)
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for at in (0, max(0, size // 2 - 2048), max(0, size - 4096)):
                fh.seek(at)
                h.update(fh.read(4096))
        stamp.append((os.path.relpath(os.path.abspath(f), root), size, h.hexdigest()[:16]))
    return _digest(stamp)


def corpus_spec(dc: DatasetConfig) -> dict:
    """What determines the corpus, cheaply (no full read); also checks that it exists."""
    if dc.source == "builtin":
        files = _stdlib_files()
        listing = [(f.name, f.stat().st_size) for f in files]
        return {"source": "builtin", "python": sys.version.split()[0], "files": _digest(listing)}
    if dc.source == "hub":
        if not dc.name:
            raise ConfigError(f"{WHERE}: dataset.name must name a hub dataset when dataset.source is hub.")
        return {"source": "hub", "name": dc.name, "config": dc.config_name, "split": dc.split}
    if not dc.path:
        raise ConfigError(f"{WHERE}: dataset.path must be set when dataset.source is {dc.source}.")
    if dc.source == "local":
        files = _local_files(dc.path)
        if not files:
            raise ConfigError(
                f"{WHERE}: dataset.path {dc.path!r} matches no .txt, .jsonl, .json or .parquet file."
            )
        kinds = {LOCAL_BUILDERS.get(Path(f).suffix) for f in files}
        if None in kinds or len(kinds) > 1:
            raise ConfigError(
                f"{WHERE}: dataset.path {dc.path!r} must match files of one kind: "
                ".txt, .jsonl/.json or .parquet."
            )
        return {"source": "local", "files": _content_stamp(files), "text_field": dc.text_field}
    path = Path(dc.path).expanduser()
    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise ConfigError(f"{WHERE}: dataset.path {dc.path!r} is not a dataset saved with save_to_disk.")
    saved = [str(f) for f in sorted(path.rglob("*")) if f.is_file()]
    return {"source": "disk", "files": _content_stamp(saved), "split": dc.split}


def _arrow_stream(ds: datasets.Dataset) -> datasets.IterableDataset:
    """A dataset already in Arrow files, read with plain reads: iterating the memory-mapped dataset
    would leave every page it touched in this process's resident set."""
    files = [f["filename"] for f in ds.cache_files]
    return datasets.load_dataset("arrow", data_files=files, split="train", streaming=True)


def load_corpus(dc: DatasetConfig) -> datasets.IterableDataset:
    """All documents of the source as a stream of one ``text`` column, nothing held in memory.

    A hub dataset is downloaded and cached by ``datasets`` first, or with ``dataset.streaming``
    read as it downloads (then ``max_chars`` downloads only what is used).
    """
    if dc.source in ("builtin", "local"):
        files = [str(f) for f in _stdlib_files()] if dc.source == "builtin" else _local_files(dc.path)
        builder = LOCAL_BUILDERS[Path(files[0]).suffix] if dc.source == "local" else "text"
        kwargs = {"sample_by": "document", "encoding_errors": "replace"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    elif dc.source == "hub":
        ds = datasets.load_dataset(dc.name, dc.config_name or None, split=dc.split, streaming=dc.streaming)
        if not dc.streaming:
            ds = _arrow_stream(ds)
    else:
        saved = datasets.load_from_disk(str(Path(dc.path).expanduser()))
        if isinstance(saved, datasets.DatasetDict):
            if dc.split not in saved:
                raise ConfigError(
                    f"{WHERE}: dataset.split {dc.split!r} is not in the saved dataset; it has "
                    f"{', '.join(saved)}."
                )
            saved = saved[dc.split]
        ds = _arrow_stream(saved)
    first = next(iter(ds), None)
    if first is None:
        raise ConfigError(f"{WHERE}: dataset.source {dc.source} gave no documents.")
    if dc.text_field not in first:
        columns = ", ".join(first)
        raise ConfigError(
            f"{WHERE}: dataset.text_field {dc.text_field!r} is not a column; the data has {columns}."
        )
    ds = ds.select_columns([dc.text_field])
    return ds.rename_column(dc.text_field, "text") if dc.text_field != "text" else ds


def documents(corpus: Iterable[dict], max_chars: int = 0) -> Iterator[str]:
    """The texts in order, up to and including the one that reaches ``max_chars`` (0: all)."""
    total = 0
    for example in corpus:
        text = example["text"] or ""
        yield text
        total += len(text)
        if max_chars and total >= max_chars:
            return


def is_validation(text: str, val_fraction: float) -> bool:
    """Train/validation by a hash of the text, the same everywhere (a corpus without a validation
    document holds out its last one)."""
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16) < int(val_fraction * 2**32)


def pieces(text: str, limit: int | None = None) -> list[str]:
    """``text`` cut into pieces of at most ``limit`` characters, each cut before a single space
    between two non-spaces: there a byte-level BPE (ours, GPT-2's) starts a new pre-token anyway,
    so the pieces tokenize exactly as the whole. Only a text without such a space for ``limit``
    characters is cut elsewhere, and other tokenizers may differ at a cut. ``limit``: ``PIECE_CHARS``."""
    limit, out, start = limit or PIECE_CHARS, [], 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + 1, start + limit)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else start + limit
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


# ---------------------------------------------------------------------------------------------
# The tokenizer


@dataclass
class Tokenizer:
    """What packing needs of a tokenizer: batch encoding, the end-of-text id, the size, and the
    transformers tokenizer that the run's ``hf/`` folder gets."""

    encode_batch: Callable[[list[str]], list[np.ndarray]]
    vocab_size: int
    eos_id: int
    spec: str
    to_transformers: Callable[[], object]

    @property
    def dtype(self) -> type:
        """The smallest integer type that holds every id (GPT-2's 50257 fit 16 bits)."""
        return np.uint16 if self.vocab_size <= 1 << 16 else np.int32


def _byte_chars() -> list[str]:
    """The printable character that byte-level BPE uses for each byte value (GPT-2's mapping)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _bytes_tokenizer() -> Tokenizer:
    def to_transformers():
        # The same ids as a tokenizers BPE without merges: one token per UTF-8 byte, then EOS.
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {c: i for i, c in enumerate(_byte_chars())}
        tok = HFTokenizer(models.BPE(vocab, []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([EOS])
        return _pretrained_fast(tok)

    encode = lambda texts: [np.frombuffer(t.encode("utf-8"), np.uint8) for t in texts]  # noqa: E731
    return Tokenizer(encode, vocab_size=257, eos_id=256, spec="bytes", to_transformers=to_transformers)


def _pretrained_fast(tok) -> object:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def _fast_tokenizer(tok, spec: str) -> Tokenizer:
    """Wrap a ``tokenizers.Tokenizer``: its batch encoder runs in Rust on all cores."""
    encode = lambda texts: [np.asarray(e.ids, np.int32) for e in tok.encode_batch_fast(texts)]  # noqa: E731
    return Tokenizer(encode, tok.get_vocab_size(), tok.token_to_id(EOS), spec, lambda: _pretrained_fast(tok))


def train_bpe(texts: Iterable[str], vocab_size: int, path: Path, progress: bool = False):
    """Byte-level BPE trained on ``texts`` (the train split, streamed in bounded batches), saved to ``path``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=alphabet, show_progress=progress
    )
    # single pieces, not lists: the trainer buffers 256 items of its iterator
    tok.train_from_iterator((p for t in texts for p in pieces(t, 1 << 16)), trainer=trainer)
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


def get_tokenizer(
    dc: DatasetConfig, spec: dict, cache_dir: Path, train_texts: Callable, progress: bool = False
) -> Tokenizer:
    """``bpe`` (trained and cached), ``bytes``, or a name/path for ``AutoTokenizer``."""
    if dc.tokenizer == "bytes":
        tok = _bytes_tokenizer()
    elif dc.tokenizer == "bpe":
        if dc.vocab_size < 257:
            raise ConfigError(
                f"{WHERE}: dataset.vocab_size must be >= 257 for the bpe tokenizer "
                f"(256 bytes and end-of-text), got {dc.vocab_size}."
            )
        from tokenizers import Tokenizer as HFTokenizer

        key = _digest(
            {"corpus": spec, "vocab": dc.vocab_size, "val": dc.val_fraction, "max_chars": dc.max_chars}
        )
        path = cache_dir / "tokenizers" / f"bpe-{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with _build_lock(path):
            hf = HFTokenizer.from_file(str(path)) if path.exists() else None
            hf = hf or train_bpe(train_texts(), dc.vocab_size, path, progress)
        tok = _fast_tokenizer(hf, f"bpe-{key}")
    else:
        tok = _auto_tokenizer(dc.tokenizer)
    if tok.vocab_size > dc.vocab_size:
        raise ConfigError(
            f"{WHERE}: dataset.vocab_size is {dc.vocab_size} but tokenizer {dc.tokenizer!r} has "
            f"{tok.vocab_size} tokens; set dataset.vocab_size to at least {tok.vocab_size}."
        )
    return tok


def _auto_tokenizer(name: str) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's input
        raise ConfigError(
            f"{WHERE}: dataset.tokenizer {name!r} could not be loaded (not bpe, bytes, a local path "
            f"or a reachable hub name): {type(e).__name__}."
        ) from None
    if hf.eos_token_id is None:
        raise ConfigError(f"{WHERE}: dataset.tokenizer {name!r} has no end-of-text token.")

    def encode_batch(texts: list[str]) -> list[np.ndarray]:
        ids = hf(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return [np.asarray(x, np.int32) for x in ids]

    return Tokenizer(encode_batch, len(hf), hf.eos_token_id, f"auto-{name}-{len(hf)}", lambda: hf)


# ---------------------------------------------------------------------------------------------
# Caching, shared with the packed data


@contextmanager
def _build_lock(target: Path, wait_s: float = 60.0):
    """The file lock under which one process per machine builds ``target``; the others then reuse it.

    Local rank 0 is the one meant to build (its log lines and bars are the ones shown), so other
    local ranks first wait up to ``wait_s`` for it to take the lock or to finish.
    """
    lock = FileLock(str(target) + ".lock")
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        deadline = time.monotonic() + wait_s
        while not target.exists() and time.monotonic() < deadline:
            try:
                lock.acquire(timeout=0)
            except Timeout:
                break  # held: the builder is at work
            lock.release()
            time.sleep(0.2)
    with lock:
        yield


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
