"""The corpus, tokenizers, packing, the cache and the batch order, on real (small) data."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import pytest
import torch

from conftest import ROOT, TINY, assert_ok, env, python_train, run_cmd, spawn
from dsinstab.run import data as D
from dsinstab.run.config import ConfigError, DatasetConfig
from dsinstab.run.corpus import documents, is_validation, load_corpus
from dsinstab.run.data import BatchOrder, prepare_data

SMALL = dict(max_chars=200_000, vocab_size=400)
BYTES = dict(tokenizer="bytes", vocab_size=257)
WORDS = "the of and to in is was for on that with as by at from his an were are which this be".split()


def write_corpus(folder, n_docs: int, words_per_doc: int, seed: int = 0) -> list[str]:
    """``n_docs`` text files of ASCII words (lines of 12, some punctuation, one non-ASCII word)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n_docs):
        marks = rng.choices(["", "", "", ",", "."], k=words_per_doc)
        words = [w + m for w, m in zip(rng.choices(WORDS, k=words_per_doc), marks, strict=True)]
        words[len(words) // 2] = "naïve"
        text = "\n".join(" ".join(words[j : j + 12]) for j in range(0, len(words), 12))
        (folder / f"{i:04d}.txt").write_text(text, encoding="utf-8")
        docs.append(text)
    return docs


def reference_blocks(docs: list[str], encode, eos: int, block: int, val_fraction: float) -> dict:
    """The packing rule written out: each split's documents in order, each followed by end-of-text,
    concatenated and cut into blocks; only the final partial block is dropped."""
    out = {}
    for name, want in (("train", False), ("validation", True)):
        stream = [t for d in docs if is_validation(d, val_fraction) == want for t in [*encode(d), eos]]
        n = len(stream) // block
        out[name] = torch.tensor(stream[: n * block]).view(n, block)
    return out


def all_blocks(data) -> dict:
    return {s: data.blocks(s, torch.arange(len(getattr(data, s)))) for s in ("train", "validation")}


@pytest.fixture
def small_steps(monkeypatch):
    """Pieces and tokenizer batches (so rows) small enough that a small corpus crosses every boundary."""
    monkeypatch.setattr(D, "PIECE_CHARS", 300)
    monkeypatch.setattr(D, "BATCH_CHARS", 2_000)


def test_builtin_corpus_split_is_deterministic_and_disjoint():
    texts = list(documents(load_corpus(DatasetConfig(**SMALL)), 200_000))
    assert sum(map(len, texts)) >= 200_000 > sum(map(len, texts[:-1]))  # cut after the crossing one
    flags = [is_validation(t, 0.1) for t in texts]
    assert flags == [is_validation(t, 0.1) for t in texts]
    assert 0 < sum(flags) < len(texts) / 2
    assert not {t for t, v in zip(texts, flags) if v} & {t for t, v in zip(texts, flags) if not v}


def test_packing_makes_full_blocks_and_the_cache_is_reused(tmp_path):
    logs = []
    first = prepare_data(DatasetConfig(**SMALL), 32, tmp_path, log=logs.append)
    second = prepare_data(DatasetConfig(**SMALL), 32, tmp_path, log=logs.append)
    assert not first.reused and second.reused
    assert any("reusing cached dataset" in line for line in logs)
    block = second.blocks("train", torch.arange(5))
    assert block.shape == (5, 33) and block.dtype == torch.long
    assert int(block.max()) < 400
    assert torch.equal(block, first.blocks("train", torch.arange(5)))
    # the end-of-text token separates documents inside the packed stream
    assert (second.blocks("train", torch.arange(len(second.train))) == second.eos_id).any()
    # a different block length is a different cache entry
    assert not prepare_data(DatasetConfig(**SMALL), 16, tmp_path, log=logs.append).reused
    assert not list((tmp_path / "tmp").iterdir())  # the build's working files are gone


def test_bytes_tokenizer(tmp_path):
    data = prepare_data(DatasetConfig(max_chars=50_000, **BYTES), 16, tmp_path, log=print)
    assert data.vocab_size == 257 and data.eos_id == 256
    with pytest.raises(ConfigError, match="dataset.vocab_size is 200 but tokenizer 'bytes' has 257 tokens"):
        prepare_data(
            DatasetConfig(max_chars=50_000, tokenizer="bytes", vocab_size=200), 16, tmp_path, log=print
        )


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_blocks_are_the_documents_in_order(tmp_path, small_steps, tokenizer):
    """On-disk packing gives the blocks of the in-memory rule: the blocks of the old code wherever it
    packed a split in one batch (<= 2000 documents); it used to drop each batch's tail."""
    docs = write_corpus(tmp_path / "corpus", 40, 150)
    if tokenizer == "bytes":  # a document without spaces, cut into pieces mid-word
        docs[7] = "x" * 700
        (tmp_path / "corpus" / "0007.txt").write_text(docs[7])
    cfg = DatasetConfig(
        source="local", path=str(tmp_path / "corpus"), tokenizer=tokenizer, vocab_size=300, val_fraction=0.2
    )
    data = prepare_data(cfg, 63, tmp_path / "cache", log=print)
    if tokenizer == "bytes":
        encode = lambda t: list(t.encode())  # noqa: E731
    else:  # the trained tokenizer on each whole document: pieces tokenize as the whole
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(next((tmp_path / "cache" / "tokenizers").glob("bpe-*.json"))))
        encode = lambda t: tok.encode(t).ids  # noqa: E731
    want = reference_blocks(docs, encode, data.eos_id, 64, 0.2)
    got = all_blocks(data)
    assert len(want["validation"]) > 0 and len(want["train"]) > 5
    for split in ("train", "validation"):
        assert torch.equal(got[split], want[split]), split


def test_workers_give_the_same_blocks_as_one(tmp_path, small_steps):
    write_corpus(tmp_path / "corpus", 9, 300, seed=1)
    (tmp_path / "corpus" / "0004.txt").write_text("")  # an empty document
    got = {}
    for n in (1, 3):
        cfg = DatasetConfig(source="local", path=str(tmp_path / "corpus"), num_proc=n, **BYTES)
        data = prepare_data(cfg, 31, tmp_path / f"cache{n}", log=print)
        got[n] = (all_blocks(data), Path(data.cache_path).name)
    assert got[1][1] == got[3][1]  # one cache key, whatever the number of processes
    for split in ("train", "validation"):
        assert torch.equal(got[1][0][split], got[3][0][split])


def test_without_a_validation_document_the_last_one_is_held_out(tmp_path, small_steps):
    docs = write_corpus(tmp_path / "corpus", 6, 200, seed=2)
    cfg = DatasetConfig(source="local", path=str(tmp_path / "corpus"), val_fraction=1e-9, num_proc=2, **BYTES)
    assert not any(is_validation(d, 1e-9) for d in docs)
    data = prepare_data(cfg, 31, tmp_path / "cache", log=print)
    got = all_blocks(data)
    last = list(docs[-1].encode()) + [256]
    assert got["validation"].flatten().tolist() == last[: len(last) // 32 * 32]
    train = [t for d in docs[:-1] for t in [*d.encode(), 256]]
    assert got["train"].flatten().tolist() == train[: len(train) // 32 * 32]


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_the_saved_tokenizer_decodes_blocks_to_corpus_text(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    docs = write_corpus(tmp_path / "corpus", 30, 200, seed=3)
    cfg = DatasetConfig(source="local", path=str(tmp_path / "corpus"), tokenizer=tokenizer, vocab_size=400)
    data = prepare_data(cfg, 127, tmp_path / "cache", log=print)
    data.save_tokenizer(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.eos_token_id == data.eos_id
    assert hf.encode(docs[0], add_special_tokens=False) == data.tokenizer.encode_batch(docs[:1])[0].tolist()
    for block in data.blocks("train", torch.arange(0, len(data.train), 7)):
        # a block edge may cut a character's UTF-8 bytes: decoded as the replacement character
        parts = [p.strip("\ufffd") for p in hf.decode(block.tolist()).split(D.EOS)]
        assert all(any(p in d for d in docs) for p in parts), parts


def test_a_run_saves_the_tokenizer_beside_the_model_config(tmp_path, cache_dir):
    """run/hf holds a tokenizer that decodes the run's blocks (a spike checkpoint converts to a model
    that can decode its batch)."""
    from transformers import AutoTokenizer

    run = tmp_path / "runs" / "tok"
    over = [f"utils.output_dir={tmp_path / 'runs'}", f"utils.cache_dir={cache_dir}", "utils.run_name=tok"]
    proc = python_train("--set", *TINY, "trainer.max_steps=1", "trainer.checkpoint_every=0", *over)
    assert_ok(proc)
    hf = AutoTokenizer.from_pretrained(str(run / "hf"))
    data = prepare_data(DatasetConfig(vocab_size=512, max_chars=400_000), 64, cache_dir, log=print)
    assert data.reused
    corpus = "".join(documents(load_corpus(DatasetConfig()), 400_000))
    for block in data.blocks("train", torch.tensor([0, 3, len(data.train) - 1])):
        assert all(p in corpus for p in hf.decode(block.tolist()).split(D.EOS))


BUILD = textwrap.dedent(
    """
    import sys, torch
    from dsinstab.run.config import DatasetConfig
    from dsinstab.run.data import prepare_data
    cfg = DatasetConfig(source="local", path=sys.argv[1], tokenizer="bytes", vocab_size=257)
    data = prepare_data(cfg, 31, sys.argv[2], log=print, progress=False)
    print("blocks", data.blocks("train", torch.arange(len(data.train))).sum().item())
    """
)


def test_local_rank_0_builds_and_the_other_ranks_reuse(tmp_path):
    """Local rank 1 arrives first, yet waits for local rank 0 (whose log lines and bars are shown)
    to build; both end with the same blocks."""
    write_corpus(tmp_path / "corpus", 6, 3000)
    cmd = [sys.executable, "-c", BUILD, str(tmp_path / "corpus"), str(tmp_path / "cache")]
    with spawn(cmd, env_={**env(), "LOCAL_RANK": "1"}, stdout=subprocess.PIPE) as rank1:
        time.sleep(3)
        rank0 = run_cmd(cmd, 300, env_={**env(), "LOCAL_RANK": "0"})
        out1, _ = rank1.communicate(timeout=300)
    assert_ok(rank0)
    assert "tokenizing and packing" in rank0.stdout and "reusing cached dataset" in out1
    assert rank0.stdout.split("blocks")[-1] == out1.split("blocks")[-1]
    meta = json.loads(next((tmp_path / "cache" / "datasets").glob("*/dsinstab.json")).read_text())
    assert meta["built_by"]["local_rank"] == 0


# BUILD, started at the same moment in each process: each signals that its imports are done (a file
# named by its pid in argv[3]), then waits for argv[3]/go.
RACE = textwrap.dedent(
    """
    import os, sys, time, torch
    from pathlib import Path
    from dsinstab.run.config import DatasetConfig
    from dsinstab.run.data import prepare_data
    gate = Path(sys.argv[3])
    (gate / f"ready-{os.getpid()}").touch()
    while not (gate / "go").exists():
        time.sleep(0.005)
    cfg = DatasetConfig(source="local", path=sys.argv[1], tokenizer="bytes", vocab_size=257)
    data = prepare_data(cfg, 31, sys.argv[2], log=print, progress=False)
    print("blocks", data.blocks("train", torch.arange(len(data.train))).sum().item())
    """
)


@pytest.mark.parametrize("local_ranks", [(0, 0), (1, 0)], ids=["two-local-rank-0s", "ranks-0-and-1"])
def test_processes_racing_on_a_cold_cache_build_it_once(tmp_path, local_ranks):
    """Released at the same moment on an empty cache, without a process group (preparing the data
    makes no collective call): one process builds under the lock while the other waits and then
    reuses it, local rank 0 where there is one (two local rank 0s: two nodes on one file system)."""
    write_corpus(tmp_path / "corpus", 6, 3000)
    gate = tmp_path / "gate"
    gate.mkdir()
    cmd = [sys.executable, "-c", RACE, str(tmp_path / "corpus"), str(tmp_path / "cache"), str(gate)]
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                spawn(
                    cmd, env_={**env(), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
            )
            for r in local_ranks
        ]
        deadline = time.time() + 300
        while len(list(gate.glob("ready-*"))) < len(procs):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "a process died"
            time.sleep(0.05)
        (gate / "go").touch()
        outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    built = [i for i, (out, _) in enumerate(outs) if "tokenizing and packing" in out]
    assert len(built) == 1, [out for out, _ in outs]
    other = outs[1 - built[0]][0]
    assert "reusing cached dataset" in other and "tokenizing and packing" not in other
    assert outs[0][0].split("blocks")[-1] == outs[1][0].split("blocks")[-1]
    folders = [f for f in (tmp_path / "cache" / "datasets").iterdir() if f.is_dir()]
    assert len(folders) == 1 and not list((tmp_path / "cache").glob("**/*.tmp"))
    meta = json.loads((folders[0] / "dsinstab.json").read_text())
    assert meta["built_by"]["local_rank"] == 0
    if 1 in local_ranks:
        assert local_ranks[built[0]] == 0  # local rank 0 builds, whoever reaches the lock first


# Prepares a corpus in a fresh process. The buffers are shrunk so that a few MB of text already fill
# each of them, and the peak is reset after the imports (whose own peak varies by tens of MB).
CHILD = textwrap.dedent(
    """
    import sys
    from dsinstab.run import data as D
    from dsinstab.run.config import DatasetConfig
    D.PIECE_CHARS, D.BATCH_CHARS, D.WRITE_BYTES = 1 << 16, 1 << 18, 1 << 21
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak RSS (ru_maxrss) starts again from here
    cfg = DatasetConfig(source="local", path=sys.argv[1], tokenizer="bytes", vocab_size=257, num_proc=2)
    D.prepare_data(cfg, 255, sys.argv[2], log=lambda m: None, progress=False)
    """
)
WRAPPER = textwrap.dedent(
    """
    import resource, subprocess, sys
    subprocess.run([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], check=True)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resets the peak RSS through /proc")
def test_peak_rss_does_not_grow_with_the_corpus(tmp_path):
    """A corpus nine times larger adds well under half its size to the peak RSS of preparing it;
    the in-memory packing added about 30 bytes per byte of text."""
    base = write_corpus(tmp_path / "base", 1, 150_000)[0]
    peak, size = {}, {}
    for n in (5, 45):  # files of about 0.65 MB, one document each
        (tmp_path / f"c{n}").mkdir()
        for i in range(n):  # rotations of one text: distinct documents, quickly written
            (tmp_path / f"c{n}" / f"{i:03d}.txt").write_text(base[i * 997 :] + base[: i * 997])
        size[n] = sum(f.stat().st_size for f in (tmp_path / f"c{n}").iterdir()) / 2**20
        proc = subprocess.run(
            [sys.executable, "-c", WRAPPER, CHILD, str(tmp_path / f"c{n}"), str(tmp_path / f"cache{n}")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        peak[n] = float(proc.stdout.split()[-1])
    assert peak[45] - peak[5] < 0.5 * (size[45] - size[5]), (peak, size)


def test_local_text_and_jsonl_sources(tmp_path):
    docs = [f"document {i}: " + "lorem ipsum dolor sit amet " * 40 for i in range(60)]
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(d)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    for cfg in (
        DatasetConfig(source="local", path=str(folder), **BYTES),
        DatasetConfig(source="local", path=str(jsonl), text_field="body", **BYTES),
    ):
        assert list(documents(load_corpus(cfg))) == docs
        assert len(prepare_data(cfg, 64, tmp_path / "cache", log=print).train) > 0


def test_a_hub_dataset_streamed_or_downloaded_gives_the_same_blocks(tmp_path, monkeypatch):
    """The hub code path, offline: ``load_dataset`` takes a folder of parquet files as a dataset id."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    docs = write_corpus(tmp_path / "txt", 30, 120, seed=4)
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for i in range(3):  # three shards of the dataset
        datasets.Dataset.from_dict({"body": docs[i * 10 : i * 10 + 10]}).to_parquet(
            tmp_path / "hub" / "data" / f"train-{i}.parquet"
        )
    got = {}
    for streaming in (False, True):
        cfg = DatasetConfig(
            source="hub",
            name=str(tmp_path / "hub"),
            text_field="body",
            streaming=streaming,
            num_proc=2,
            **BYTES,
        )
        assert list(documents(load_corpus(cfg))) == docs
        data = prepare_data(cfg, 63, tmp_path / f"cache-{streaming}", log=print)
        got[streaming] = (all_blocks(data), Path(data.cache_path).name)
    assert got[False][1] == got[True][1]
    want = reference_blocks(docs, lambda t: list(t.encode()), 256, 64, 0.02)
    for split in ("train", "validation"):
        assert torch.equal(got[False][0][split], want[split]) and torch.equal(
            got[True][0][split], want[split]
        )


def test_disk_source(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["abc " * 500] * 20})).save_to_disk(
        str(saved)
    )
    cfg = DatasetConfig(source="disk", path=str(saved), **BYTES)
    assert len(list(documents(load_corpus(cfg)))) == 20
    with pytest.raises(ConfigError, match="dataset.split 'test' is not in the saved dataset; it has train"):
        load_corpus(DatasetConfig(source="disk", path=str(saved), split="test"))


def test_the_cache_key_ignores_where_the_corpus_lies(tmp_path):
    """Nodes with their own copy of the corpus (other path, other modification times) and their
    own cache agree on the key; an edit changes it."""
    write_corpus(tmp_path / "a", 3, 100)
    write_corpus(tmp_path / "b", 3, 100)  # the same text, written later elsewhere
    spec = lambda folder: D.corpus_spec(DatasetConfig(source="local", path=str(tmp_path / folder)))  # noqa: E731
    assert spec("a") == spec("b")
    (tmp_path / "b" / "0001.txt").write_text("another text of another size")
    assert spec("a") != spec("b")


def test_long_documents_are_cut_where_byte_level_bpe_splits_anyway():
    text = "alpha beta  gamma\tdelta epsilon " * 50
    parts = D.pieces(text, 60)
    assert "".join(parts) == text and max(map(len, parts)) <= 60
    assert all(
        p[0] == " " and not p[1].isspace() and not parts[i][-1].isspace() for i, p in enumerate(parts[1:])
    )


@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            DatasetConfig(source="local", path="/nonexistent/*.txt"),
            "matches no .txt, .jsonl, .json or .parquet file",
        ),
        (DatasetConfig(source="local"), "dataset.path must be set when dataset.source is local"),
        (DatasetConfig(source="disk", path="/tmp"), "is not a dataset saved with save_to_disk"),
        (DatasetConfig(source="hub"), "dataset.name must name a hub dataset"),
        (DatasetConfig(tokenizer="bpe", vocab_size=100), "must be >= 257 for the bpe tokenizer"),
        (
            DatasetConfig(max_chars=2000, tokenizer="bytes", vocab_size=257),
            "the corpus gives no train block of model.seq_len + 1 = 257",
        ),
    ],
)
def test_bad_data_input(tmp_path, cfg, message):
    with pytest.raises(ConfigError) as e:
        prepare_data(cfg, 256, tmp_path, log=print)
    assert message in str(e.value) and str(e.value).startswith("configs/dataset.yaml")


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    a = BatchOrder(100, 4, 1, 0, seed=3)
    b = BatchOrder(100, 4, 1, 0, seed=3)
    seq_a = [a.next() for _ in range(60)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, [b.next() for _ in range(60)]))
    assert not torch.equal(seq_a[0], BatchOrder(100, 4, 1, 0, seed=4).next())
    epoch0 = torch.cat(seq_a[:25])
    assert sorted(epoch0.tolist()) == list(range(100))  # an epoch visits every block once
    assert not torch.equal(epoch0, torch.cat(seq_a[25:50]))  # and the next epoch reshuffles
    c = BatchOrder(100, 4, 1, 0, seed=3)
    c.load_state_dict({"position": 37})
    assert torch.equal(c.next(), seq_a[37])


def test_batch_order_reseed_reads_the_other_seed_at_the_same_position_and_survives_a_resume():
    a = BatchOrder(100, 4, 1, 0, seed=3)
    for _ in range(37):
        a.next()
    a.reseed(11)
    assert a.position == 37 and a.seed == 11
    fresh = BatchOrder(100, 4, 1, 0, seed=11)
    fresh.position = 37
    want = [fresh.next() for _ in range(30)]  # across an epoch boundary (25 micro batches each)
    got = [a.next() for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(got, want[:5]))
    state = json.loads(json.dumps(a.state_dict()))  # as the checkpoint keeps it
    assert state == {"position": 42, "seed": 11}
    resumed = BatchOrder(100, 4, 1, 0, seed=3)  # built from the config's seed, as a resume does
    resumed.load_state_dict(state)
    assert resumed.seed == 11
    assert all(torch.equal(resumed.next(), y) for y in want[5:])


def test_batch_order_skip_reads_what_an_unbroken_order_reads_that_many_micro_batches_later():
    unbroken = BatchOrder(100, 4, 2, 1, seed=5)
    seq = [unbroken.next() for _ in range(40)]
    a = BatchOrder(100, 4, 2, 1, seed=5)
    for _ in range(3):
        a.next()
    a.skip(20)  # past the end of the first epoch (12 micro batches of 4 x 2 ranks)
    assert a.position == 23
    assert all(torch.equal(a.next(), y) for y in seq[23:40])
    a.skip(0)
    assert a.position == 40


def test_batch_order_shards_ranks_disjointly():
    ranks = [BatchOrder(64, 4, 2, r, seed=0) for r in range(2)]
    for _ in range(8):
        r0, r1 = ranks[0].next(), ranks[1].next()
        assert not set(r0.tolist()) & set(r1.tolist())


def test_corpus_too_small_for_one_global_batch():
    with pytest.raises(ConfigError, match="fewer than one global micro batch"):
        BatchOrder(5, 4, 2, 0, seed=0)
