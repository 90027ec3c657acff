"""The corpus, the tokenizer, tokenize + pack into fixed blocks, the on-disk cache, the batch order.

Sources: ``builtin`` (the standard library's own source files, present in every Python install, so
the default run needs no network), ``hub`` (``datasets.load_dataset``), ``local`` (text, JSON lines
or parquet files) and ``disk`` (``datasets.load_from_disk``). Documents are split into train and
validation by a hash of their text, so the split is the same on every machine and every run.

Preparation holds neither the corpus nor the blocks in memory: documents are streamed (plain reads;
the pages of a memory map would stay in the resident set), tokenized by ``dataset.num_proc``
processes one source shard at a time (so the result does not depend on how many), packed in one
ordered pass and written to Arrow files, from which training reads blocks by index, memory-mapped.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
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
import pyarrow as pa
import pyarrow.compute as pc
import torch
from filelock import FileLock, Timeout

from dsinstab.run.config import ConfigError, DatasetConfig

EOS = "<|endoftext|>"
CACHE_VERSION = 2  # bump when the packing format changes (2: streamed, carried across documents)
WHERE = "configs/dataset.yaml"
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PIECE_CHARS = 1 << 20  # a longer document is tokenized in pieces of at most this many characters
BATCH_CHARS = 1 << 22  # documents go to the tokenizer in batches of about this many characters
WRITE_BYTES = 8 << 20  # the packed blocks are written in record batches of about this size

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


def _batches(texts: Iterable[str], limit: int) -> Iterator[list[str]]:
    """The texts, in order, in lists of about ``limit`` characters."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


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
# Tokenize, pack, cache


@dataclass
class PackedData:
    """Fixed blocks of ``seq_len + 1`` token ids (inputs and shifted targets) for train and val,
    memory-mapped from the cache."""

    train: datasets.Dataset
    validation: datasets.Dataset
    vocab_size: int
    eos_id: int
    cache_path: str
    reused: bool
    tokenizer: Tokenizer | None = None

    def blocks(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        ds = self.train if split == "train" else self.validation
        return ds[indices.tolist()]["input_ids"].long()

    def save_tokenizer(self, directory: str | Path) -> None:
        """Save the tokenizer as a transformers one (``AutoTokenizer.from_pretrained(directory)``).

        ``bpe`` and ``bytes`` are saved as a ``PreTrainedTokenizerFast`` that gives the same ids
        (``bytes``: one token per UTF-8 byte, end-of-text 256); an ``AutoTokenizer`` name as itself.
        """
        if self.tokenizer is not None:
            self.tokenizer.to_transformers().save_pretrained(str(directory))


def _tokenize_job(
    part: list[int], corpus, parts: int, tok: Tokenizer, val_fraction: float, max_chars: int
) -> Iterator[dict]:
    """One part (contiguous source shards) -> rows ``{ids, val, last}``: for each batch of
    documents, the ids of its train documents and of its validation documents, each followed by
    end-of-text. The part's final document gets a row of its own, marked ``last`` = the part's
    index (else -1), so that a corpus without a validation document can hold out its last one."""
    docs = corpus if parts == 1 else corpus.shard(num_shards=parts, index=part[0], contiguous=True)
    eos = np.array([tok.eos_id], tok.dtype)

    def rows(texts: list[str], last: int = -1) -> Iterator[dict]:
        cut = [pieces(t) for t in texts]
        # one tokenizer call per PIECE_CHARS: a tokenizer's encodings take ~100 bytes per token
        ids = (x for b in _batches((p for c in cut for p in c), PIECE_CHARS) for x in tok.encode_batch(b))
        splits: dict[bool, list] = {False: [], True: []}
        for text, c in zip(texts, cut, strict=True):
            splits[is_validation(text, val_fraction)] += [*(next(ids).astype(tok.dtype) for _ in c), eos]
        yield from ({"ids": np.concatenate(p), "val": v, "last": last} for v, p in splits.items() if p)

    pending, size = [], 0
    for text in documents(docs, max_chars):
        if size >= BATCH_CHARS:  # a batch goes once a later document exists: the final one stays
            yield from rows(pending)
            pending, size = [], 0
        pending.append(text)
        size += len(text)
    if not pending:  # an empty shard still writes a row (without tokens): a writer needs one
        yield {"ids": np.empty(0, tok.dtype), "val": False, "last": -1}
        return
    yield from rows(pending[:-1])
    yield from rows(pending[-1:], last=part[0])


def _row_tables(files: tuple[str, ...]) -> Iterator[pa.Table]:
    """The tokenized rows in order, one at a time, by plain reads (see ``_arrow_stream``)."""
    rows = datasets.load_dataset("arrow", data_files=list(files), split="train", streaming=True)
    yield from rows.with_format("arrow").iter(batch_size=1)


def _pack_job(files: tuple[str, ...], want_val: bool, held: tuple[int, int], block: int, dtype: type):
    """The rows of one split, in order, cut into blocks of ``block`` tokens. The remainder carries
    over to the next row and document; only the split's final partial block is dropped."""
    carry, seen = np.empty(0, dtype), 0
    for table in _row_tables(files):
        at = np.arange(seen, seen + len(table))
        seen += len(table)
        val = table["val"].to_numpy(zero_copy_only=False) | ((at >= held[0]) & (at < held[1]))
        keep = val if want_val else ~val
        if not keep.any():
            continue
        ids = pc.list_flatten(table.filter(pa.array(keep))["ids"]).to_numpy()
        flat = np.concatenate([carry, ids])
        full = len(flat) // block * block
        for i in range(0, full, block):
            yield {"input_ids": flat[i : i + block]}
        carry = flat[full:].copy()


def _row_splits(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Each row's split and length, and the rows of the corpus's final document when it is held
    out because no document fell into validation."""
    parts = [  # copies: a view would keep the whole record batch it came from alive
        [c.to_numpy().copy() for c in (t["val"], t["last"], pc.list_value_length(t["ids"]))]
        for t in _row_tables(files)
    ]
    val, last, lengths = (np.concatenate(p) for p in zip(*parts, strict=True))
    if val.any() or not (last >= 0).any():
        return val, lengths, (0, 0)
    end = int(np.flatnonzero(last >= 0)[-1]) + 1
    start = end - 1
    while start > 0 and last[start - 1] == last[end - 1]:
        start -= 1
    val[start:end] = True
    return val, lengths, (start, end)


def _build(dc: DatasetConfig, corpus, tok: Tokenizer, block: int, work: Path, dest: Path, log) -> dict:
    """Tokenize with ``num_proc`` processes, pack, and move the Arrow files into ``dest``."""
    # Each process takes a contiguous part of the source shards, and packing concatenates each
    # split's rows in order: the blocks do not depend on num_proc. max_chars needs the documents
    # counted in order, by one process.
    workers = 1 if dc.max_chars else min(dc.num_proc, corpus.num_shards)
    log(f"tokenizing {corpus.num_shards} source shard(s) with {workers} process(es)")
    if workers > 1:  # forked workers must not use the tokenizer's threads (and say so)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # No `features` for either writer: with them, datasets turns every numpy row into a Python
    # list first (30x slower); the types come from the numpy arrays.
    tokens = datasets.Dataset.from_generator(
        _tokenize_job,
        cache_dir=str(work),
        gen_kwargs=dict(
            part=list(range(workers)),
            corpus=corpus,
            parts=workers,
            tok=tok,
            val_fraction=dc.val_fraction,
            max_chars=dc.max_chars,
        ),  # fmt: skip
        num_proc=workers if workers > 1 else None,
        split=datasets.NamedSplit("tokens"),
        fingerprint=f"tokens-{dest.name}",
        writer_batch_size=1,  # a row holds a batch of documents: several MB
    )
    # the rows are read back with plain reads: touching the memory-mapped `tokens` would leave
    # pages in the resident set in proportion to the corpus
    files = tuple(f["filename"] for f in tokens.cache_files)
    del tokens  # unmaps the files (opening them mapped each record batch's header)
    val, lengths, held = _row_splits(files)
    counts = {}
    for name, rows in (("train", ~val), ("validation", val)):
        counts[name] = int(lengths[rows].sum()) // block
        if counts[name] == 0:
            raise ConfigError(
                f"{WHERE}: the corpus gives no {name} block of model.seq_len + 1 = {block} "
                "tokens; use more text or a shorter model.seq_len."
            )
    for name in ("train", "validation"):
        log(f"packing {counts[name]:,} {name} blocks of {block} tokens")
        packed = datasets.Dataset.from_generator(
            _pack_job,
            cache_dir=str(work),
            gen_kwargs=dict(
                files=files, want_val=name == "validation", held=held, block=block, dtype=tok.dtype
            ),
            split=datasets.NamedSplit(name),
            fingerprint=f"{name}-{dest.name}",
            # record batches of ~8 MB: opening the files reads each batch's header through the
            # memory map, so few batches keep that small
            writer_batch_size=max(1, WRITE_BYTES // (block * np.dtype(tok.dtype).itemsize)),
        )
        (dest / name).mkdir(parents=True)
        written, packed = [f["filename"] for f in packed.cache_files], None
        for i, f in enumerate(written):
            os.replace(f, dest / name / f"{i:05d}.arrow")
    return counts


def prepare_data(
    dc: DatasetConfig, seq_len: int, cache_dir: str | Path, log=print, progress: bool | None = None
) -> PackedData:
    """Load the packed dataset from the cache, or build it and cache it (one builder per machine).

    ``progress``: show ``datasets``' and the BPE trainer's bars (default: on global rank 0).
    """
    cache_dir = Path(cache_dir).expanduser()
    progress = os.environ.get("RANK", "0") == "0" if progress is None else progress
    spec = corpus_spec(dc)
    corpus: dict = {}

    def stream() -> datasets.IterableDataset:
        if "ds" not in corpus:
            corpus["ds"] = load_corpus(dc)
        return corpus["ds"]

    def train_texts() -> Iterator[str]:
        # (the held-out last document of a corpus without validation documents is trained on)
        return (t for t in documents(stream(), dc.max_chars) if not is_validation(t, dc.val_fraction))

    with _progress_bars(progress):
        tok = get_tokenizer(dc, spec, cache_dir, train_texts, progress)
    # not num_proc nor streaming: they do not change the blocks, and every node computes the same key
    key = dict(v=CACHE_VERSION, corpus=spec, tokenizer=tok.spec, block=seq_len + 1, val=dc.val_fraction)
    key = _digest({**key, "max_chars": dc.max_chars})
    path = cache_dir / "datasets" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(path):
        reused = path.exists()
        if reused:
            log(f"reusing cached dataset {path}")
        else:
            log(f"tokenizing and packing into blocks of {seq_len + 1} -> {path}")
            # on a file system shared by several machines whose locks do not reach each other, two
            # builders can race: each works in its own folder and the first to finish wins
            mine = f"{key}-{socket.gethostname()}-{os.getpid()}"
            work, tmp = cache_dir / "tmp" / mine, path.with_name(f"{mine}.tmp")
            killed = f"{key}-{socket.gethostname()}-*"  # a killed build's leftovers on this machine
            for stale in [*(cache_dir / "tmp").glob(killed), *path.parent.glob(killed + ".tmp")]:
                shutil.rmtree(stale, ignore_errors=True)
            try:
                start = time.perf_counter()
                with _progress_bars(progress):
                    counts = _build(dc, stream(), tok, seq_len + 1, work, tmp, log)
                who = {"host": socket.gethostname(), "local_rank": int(os.environ.get("LOCAL_RANK", "0"))}
                meta = {"corpus": spec, "tokenizer": tok.spec, "blocks": counts, "built_by": who}
                (tmp / "dsinstab.json").write_text(json.dumps(meta))
                _publish(tmp, path)
                n = sum(counts.values()) * (seq_len + 1)
                log(f"packed {n:,} tokens in {time.perf_counter() - start:.0f} s")
            finally:
                shutil.rmtree(work, ignore_errors=True)
                shutil.rmtree(tmp, ignore_errors=True)
    train, validation = (_load_split(path / name) for name in ("train", "validation"))
    return PackedData(train, validation, tok.vocab_size, tok.eos_id, str(path), reused, tok)


def _load_split(folder: Path) -> datasets.Dataset:
    parts = [datasets.Dataset.from_file(str(f)) for f in sorted(folder.glob("*.arrow"))]
    return datasets.concatenate_datasets(parts).with_format("torch")


def _publish(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError:
        if not (path / "dsinstab.json").exists():
            raise  # not another builder's finished copy: a real failure


@contextmanager
def _progress_bars(on: bool):
    if on:
        datasets.enable_progress_bars()
    try:
        yield
    finally:
        datasets.disable_progress_bars()


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


# ---------------------------------------------------------------------------------------------
# The batch order


class BatchOrder:
    """Which blocks each rank reads at each micro step: a pure function of seed, epoch and position.

    Each epoch is a permutation seeded by ``(seed, epoch)``; micro step ``p`` of the run reads the
    ``p``-th slice of ``micro_batch * world`` blocks, and rank ``r`` its ``r``-th part. The position
    is all the state there is, so a checkpoint that stores it resumes the exact order.
    """

    def __init__(self, n_blocks: int, micro_batch: int, world: int, rank: int, seed: int):
        self.n_blocks, self.micro_batch, self.world, self.rank, self.seed = (
            n_blocks,
            micro_batch,
            world,
            rank,
            seed,
        )
        self.per_epoch = n_blocks // (micro_batch * world)
        if self.per_epoch == 0:
            raise ConfigError(
                f"{WHERE}: the corpus has {n_blocks} training blocks, fewer than one global micro "
                f"batch ({micro_batch} x {world} ranks); use more text or a smaller "
                "trainer.micro_batch_size."
            )
        self.position = 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def indices_at(self, position: int) -> torch.Tensor:
        epoch, i = divmod(position, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n_blocks, generator=g))
        start = (i * self.world + self.rank) * self.micro_batch
        return self._perm[1][start : start + self.micro_batch]

    def next(self) -> torch.Tensor:
        idx = self.indices_at(self.position)
        self.position += 1
        return idx

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
