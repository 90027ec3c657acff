"""The corpus, the tokenizer, tokenize + pack into fixed blocks, the on-disk cache, the batch order.

Sources: ``builtin`` (the standard library's own source files, present in every Python install, so
the default run needs no network), ``hub`` (``datasets.load_dataset``), ``local`` (text, JSON lines
or parquet files) and ``disk`` (``datasets.load_from_disk``). Documents are split into train and
validation by a hash of their text, so the split is the same on every machine and every run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import datasets
import torch
from filelock import FileLock

from dsinstab.config import ConfigError, DatasetConfig

EOS = "<|endoftext|>"
CACHE_VERSION = 1  # bump when the packing format changes
WHERE = "configs/dataset.yaml"
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

datasets.disable_progress_bars()


# ---------------------------------------------------------------------------------------------
# The corpus


def _stdlib_files() -> list[Path]:
    """Every non-test source file of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
    files = [f for f in root.rglob("*.py") if not skip.intersection(f.relative_to(root).parts)]
    return sorted(files, key=lambda f: str(f.relative_to(root)))


def _local_files(pattern: str) -> list[str]:
    p = Path(pattern).expanduser()
    if p.is_dir():
        files = [str(f) for f in sorted(p.rglob("*")) if f.suffix in LOCAL_BUILDERS]
    else:
        files = sorted(glob.glob(str(p)))
    return files


def corpus_spec(dc: DatasetConfig) -> dict:
    """What determines the corpus, cheaply (no text is read); also checks that it exists."""
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
        stats = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]
        return {"source": "local", "files": _digest(stats), "text_field": dc.text_field}
    path = Path(dc.path).expanduser()
    if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        raise ConfigError(f"{WHERE}: dataset.path {dc.path!r} is not a dataset saved with save_to_disk.")
    stamp = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime) for f in sorted(path.rglob("*"))]
    return {"source": "disk", "path": str(path.resolve()), "files": _digest(stamp), "split": dc.split}


def load_corpus(dc: DatasetConfig) -> datasets.Dataset:
    """All documents of the source as a dataset with one ``text`` column."""
    if dc.source == "builtin":
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in _stdlib_files()]
        ds = datasets.Dataset.from_dict({"text": texts})
    elif dc.source == "hub":
        ds = datasets.load_dataset(dc.name, dc.config_name or None, split=dc.split)
    elif dc.source == "local":
        files = _local_files(dc.path)
        builder = LOCAL_BUILDERS[Path(files[0]).suffix]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
    else:
        ds = datasets.load_from_disk(str(Path(dc.path).expanduser()))
        if isinstance(ds, datasets.DatasetDict):
            if dc.split not in ds:
                raise ConfigError(
                    f"{WHERE}: dataset.split {dc.split!r} is not in the saved dataset; it has {', '.join(ds)}."
                )
            ds = ds[dc.split]
    if dc.text_field not in ds.column_names:
        raise ConfigError(
            f"{WHERE}: dataset.text_field {dc.text_field!r} is not a column; the data has "
            f"{', '.join(ds.column_names)}."
        )
    ds = ds.select_columns([dc.text_field])
    if dc.text_field != "text":
        ds = ds.rename_column(dc.text_field, "text")
    if dc.max_chars:
        lengths = [len(t) for t in ds["text"]]
        total, keep = 0, 0
        while keep < len(lengths) and total < dc.max_chars:
            total, keep = total + lengths[keep], keep + 1
        ds = ds.select(range(keep))
    if len(ds) == 0:
        raise ConfigError(f"{WHERE}: dataset.source {dc.source} gave no documents.")
    return ds


def split_by_document(ds: datasets.Dataset, val_fraction: float) -> datasets.DatasetDict:
    """Train/validation by a hash of each document's text: deterministic everywhere."""
    cut = int(val_fraction * 2**32)

    def is_val(batch):
        return [int(hashlib.sha1(t.encode()).hexdigest()[:8], 16) < cut for t in batch["text"]]

    flags = ds.map(lambda b: {"_val": is_val(b)}, batched=True, keep_in_memory=True)["_val"]
    val_idx = [i for i, v in enumerate(flags) if v]
    train_idx = [i for i, v in enumerate(flags) if not v]
    if not val_idx and train_idx:  # tiny corpora: hold out the last document
        val_idx, train_idx = train_idx[-1:], train_idx[:-1]
    return datasets.DatasetDict(train=ds.select(train_idx), validation=ds.select(val_idx))


# ---------------------------------------------------------------------------------------------
# The tokenizer


@dataclass
class Tokenizer:
    """What packing needs of a tokenizer: batch encoding, the end-of-text id and the size."""

    encode_batch: Callable[[list[str]], list[list[int]]]
    vocab_size: int
    eos_id: int
    spec: str


def _bytes_tokenizer() -> Tokenizer:
    return Tokenizer(
        encode_batch=lambda texts: [list(t.encode("utf-8")) for t in texts],
        vocab_size=257,
        eos_id=256,
        spec="bytes",
    )


def _fast_tokenizer(tok, spec: str) -> Tokenizer:
    """Wrap a ``tokenizers.Tokenizer``: its batch encoder runs in Rust on all cores."""
    eos = tok.token_to_id(EOS)
    return Tokenizer(
        encode_batch=lambda texts: [e.ids for e in tok.encode_batch(texts)],
        vocab_size=tok.get_vocab_size(),
        eos_id=eos,
        spec=spec,
    )


def train_bpe(texts: datasets.Dataset, vocab_size: int, path: Path):
    """Byte-level BPE trained on the train split, saved to ``path``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((b["text"] for b in texts.iter(batch_size=1000)), trainer=trainer)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


def get_tokenizer(dc: DatasetConfig, spec: dict, cache_dir: Path, train_texts: Callable) -> Tokenizer:
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

        key = _digest({"corpus": spec, "vocab": dc.vocab_size, "val": dc.val_fraction})
        path = cache_dir / "tokenizers" / f"bpe-{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            hf = (
                HFTokenizer.from_file(str(path))
                if path.exists()
                else train_bpe(train_texts(), dc.vocab_size, path)
            )
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
    return Tokenizer(
        encode_batch=lambda texts: hf(texts, add_special_tokens=False)["input_ids"],
        vocab_size=len(hf),
        eos_id=hf.eos_token_id,
        spec=f"auto-{name}-{len(hf)}",
    )


# ---------------------------------------------------------------------------------------------
# Tokenize, pack, cache


@dataclass
class PackedData:
    """Fixed blocks of ``seq_len + 1`` token ids (inputs and shifted targets) for train and val."""

    train: datasets.Dataset
    validation: datasets.Dataset
    vocab_size: int
    eos_id: int
    cache_path: str
    reused: bool

    def blocks(self, split: str, indices: torch.Tensor) -> torch.Tensor:
        ds = self.train if split == "train" else self.validation
        return ds[indices.tolist()]["input_ids"].long()


def pack(split: datasets.Dataset, tok: Tokenizer, block: int, num_proc: int) -> datasets.Dataset:
    """Tokenize each document, append end-of-text, concatenate and cut into blocks of ``block``."""

    def tokenize_and_pack(batch):
        ids = [doc + [tok.eos_id] for doc in tok.encode_batch(batch["text"])]
        flat = list(chain.from_iterable(ids))
        n = len(flat) // block * block
        return {"input_ids": [flat[i : i + block] for i in range(0, n, block)]}

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    return split.map(
        tokenize_and_pack,
        batched=True,
        batch_size=2000,
        remove_columns=split.column_names,
        features=features,
        num_proc=num_proc if num_proc > 1 else None,
        keep_in_memory=True,
    )


def prepare_data(dc: DatasetConfig, seq_len: int, cache_dir: str | Path, log=print) -> PackedData:
    """Load the packed dataset from the cache, or build it and cache it (one builder at a time)."""
    cache_dir = Path(cache_dir).expanduser()
    spec = corpus_spec(dc)
    corpus: dict = {}

    def splits() -> datasets.DatasetDict:
        if "ds" not in corpus:
            corpus["ds"] = split_by_document(load_corpus(dc), dc.val_fraction)
        return corpus["ds"]

    tok = get_tokenizer(dc, spec, cache_dir, lambda: splits()["train"])
    key = _digest(
        {
            "v": CACHE_VERSION,
            "corpus": spec,
            "tokenizer": tok.spec,
            "block": seq_len + 1,
            "val": dc.val_fraction,
            "max_chars": dc.max_chars,
        }
    )
    path = cache_dir / "datasets" / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        reused = path.exists()
        if reused:
            log(f"reusing cached dataset {path}")
        else:
            log(f"tokenizing and packing into blocks of {seq_len + 1} -> {path}")
            packed = datasets.DatasetDict(
                {name: pack(split, tok, seq_len + 1, dc.num_proc) for name, split in splits().items()}
            )
            _check_not_empty(packed, seq_len)
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            packed.save_to_disk(str(tmp))
            (tmp / "dsinstab.json").write_text(json.dumps({"corpus": spec, "tokenizer": tok.spec}))
            os.replace(tmp, path)
    packed = datasets.load_from_disk(str(path)).with_format("torch")
    return PackedData(packed["train"], packed["validation"], tok.vocab_size, tok.eos_id, str(path), reused)


def _check_not_empty(packed: datasets.DatasetDict, seq_len: int) -> None:
    for name in ("train", "validation"):
        if len(packed[name]) == 0:
            raise ConfigError(
                f"{WHERE}: the corpus gives no {name} block of model.seq_len + 1 = {seq_len + 1} "
                "tokens; use more text or a shorter model.seq_len."
            )


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
