"""Tokenize + pack into fixed blocks, the on-disk cache, the batch order, the batches read ahead.

Preparation holds neither the corpus nor the blocks in memory: documents are streamed (plain reads;
the pages of a memory map would stay in the resident set), tokenized by ``dataset.num_proc``
processes one source shard at a time (so the result does not depend on how many), packed in one
ordered pass and written to Arrow files, from which training reads blocks by index, memory-mapped.
Where the documents come from and the tokenizer: :mod:`dsinstab.run.corpus`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dsinstab.run.config import ConfigError, DatasetConfig
from dsinstab.run.corpus import (
    EOS as EOS,  # re-exported: the end-of-text token of the packed blocks
)
from dsinstab.run.corpus import (
    PIECE_CHARS,
    WHERE,
    Tokenizer,
    _build_lock,
    _digest,
    corpus_spec,
    documents,
    get_tokenizer,
    is_validation,
    load_corpus,
    pieces,
)

CACHE_VERSION = 2  # bump when the packing format changes (2: streamed, carried across documents)
BATCH_CHARS = 1 << 22  # documents go to the tokenizer in batches of about this many characters
WRITE_BYTES = 8 << 20  # the packed blocks are written in record batches of about this size


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
        cut = [pieces(t, PIECE_CHARS) for t in texts]  # this module's PIECE_CHARS rules packing
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


# ---------------------------------------------------------------------------------------------
# The batch order


class BatchOrder:
    """Which blocks each rank reads at each micro step: a pure function of seed, epoch and position.

    Each epoch is a permutation seeded by ``(seed, epoch)``; micro step ``p`` of the run reads the
    ``p``-th slice of ``micro_batch * world`` blocks, and rank ``r`` its ``r``-th part. The seed and
    the position are all the state there is, so a checkpoint that stores them resumes the exact order.
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
        self._perm: tuple[int, int, torch.Tensor] | None = None  # (seed, epoch, permutation)

    def indices_at(self, position: int) -> torch.Tensor:
        epoch, i = divmod(position, self.per_epoch)
        if self._perm is None or self._perm[:2] != (self.seed, epoch):
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (self.seed, epoch, torch.randperm(self.n_blocks, generator=g))
        start = (i * self.world + self.rank) * self.micro_batch
        return self._perm[2][start : start + self.micro_batch]

    def next(self) -> torch.Tensor:
        idx = self.indices_at(self.position)
        self.position += 1
        return idx

    def reseed(self, seed: int) -> None:
        """From now on read the permutations of ``seed``: the next micro step reads what a fresh
        order of ``seed`` reads at the same position (the position is kept; ``state_dict`` keeps
        the seed, so a resume goes on in the new order)."""
        self.seed = int(seed)

    def skip(self, micro_batches: int) -> None:
        """Advance the position past ``micro_batches`` micro batches, unread (each rank the same)."""
        if micro_batches < 0:
            raise ValueError(f"BatchOrder.skip: micro_batches must be >= 0, got {micro_batches}.")
        self.position += int(micro_batches)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self.seed = int(state.get("seed", self.seed))  # checkpoints before reseed() kept no seed


class MicroBatch(NamedTuple):
    indices: torch.Tensor  # the blocks' indices, on the host (a slice of the order's permutation)
    host: torch.Tensor  # the blocks as read (pinned on CUDA), kept until the copy is taken
    batch: torch.Tensor  # the blocks on the device


class Batches:
    """The training micro batches as the loop takes them: :class:`BatchOrder`'s blocks, on the device.

    :meth:`prefetch` reads the next ``ahead`` micro batches early (the loop calls it once a step's
    work is queued, before the step's one host sync, so on a GPU the read overlaps the device's
    work), each kept under the ``(seed, position)`` it was read for. :meth:`next` uses one only if
    the order is still there: a branch's skip or reshuffle, a rollback or a restore move the order,
    and the read is then fresh. What a micro batch holds is thus a function of the order alone, as
    without prefetch, and the order moves only as batches are taken, so a checkpoint holds the
    same position and a resumed run reads the same blocks.
    """

    def __init__(self, data: PackedData, order: BatchOrder, device, ahead: int = 0):
        self.data, self.order, self.device, self.ahead = data, order, torch.device(device), ahead
        # page-locked on CUDA: a copy from pageable memory waits for the stream to drain, a host
        # sync per micro batch. (torch's pinning: its caching host allocator reuses the blocks,
        # where DeepSpeed's pin_memory would count every step's as newly pinned.)
        self.pin = self.device.type == "cuda"
        self.read_ahead: dict[tuple[int, int], MicroBatch] = {}
        self.taken_ahead = 0  # micro batches taken from what was read ahead

    def next(self) -> MicroBatch:
        """The next micro batch; moves the order on by one."""
        got = self.read_ahead.pop((self.order.seed, self.order.position), None) if self.read_ahead else None
        if got is None:
            self.read_ahead.clear()  # read for where the order no longer is
            return self._read(self.order.next())
        self.order.skip(1)  # taken from what was read ahead
        self.taken_ahead += 1
        return got

    def prefetch(self) -> None:
        """Read the next ``ahead`` micro batches now, and start their copies to the device."""
        if not self.ahead:
            return
        seed, position = self.order.seed, self.order.position
        for p in range(position, position + self.ahead):
            if (seed, p) not in self.read_ahead:
                self.read_ahead[(seed, p)] = self._read(self.order.indices_at(p))

    def _read(self, indices: torch.Tensor) -> MicroBatch:
        host = self.data.blocks("train", indices)
        if self.pin:
            host = host.pin_memory()
        return MicroBatch(indices, host, host.to(self.device, non_blocking=True))
