"""The corpus, tokenizers, packing, the cache and the batch order, on real (small) data."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from dsinstab.config import ConfigError, DatasetConfig
from dsinstab.data import BatchOrder, load_corpus, prepare_data, split_by_document

SMALL = dict(max_chars=200_000, vocab_size=400)


def test_builtin_corpus_split_is_deterministic_and_disjoint():
    ds = load_corpus(DatasetConfig(**SMALL))
    a, b = split_by_document(ds, 0.1), split_by_document(ds, 0.1)
    assert a["validation"]["text"] == b["validation"]["text"]
    assert len(a["validation"]) > 0 and len(a["train"]) > len(a["validation"])
    assert not set(a["train"]["text"]) & set(a["validation"]["text"])
    assert sum(map(len, ds["text"])) >= 200_000


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


def test_bytes_tokenizer(tmp_path):
    data = prepare_data(
        DatasetConfig(max_chars=50_000, tokenizer="bytes", vocab_size=257), 16, tmp_path, log=print
    )
    assert data.vocab_size == 257 and data.eos_id == 256
    with pytest.raises(ConfigError, match="dataset.vocab_size is 200 but tokenizer 'bytes' has 257 tokens"):
        prepare_data(
            DatasetConfig(max_chars=50_000, tokenizer="bytes", vocab_size=200), 16, tmp_path, log=print
        )


def test_local_text_and_jsonl_sources(tmp_path):
    docs = [f"document {i}: " + "lorem ipsum dolor sit amet " * 40 for i in range(60)]
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:03d}.txt").write_text(d)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    for cfg in (
        DatasetConfig(source="local", path=str(folder), tokenizer="bytes", vocab_size=257),
        DatasetConfig(source="local", path=str(jsonl), text_field="body", tokenizer="bytes", vocab_size=257),
    ):
        ds = load_corpus(cfg)
        assert sorted(ds["text"]) == sorted(docs)
        assert len(prepare_data(cfg, 64, tmp_path / "cache", log=print).train) > 0


def test_disk_source(tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": ["abc " * 500] * 20})).save_to_disk(
        str(saved)
    )
    cfg = DatasetConfig(source="disk", path=str(saved), tokenizer="bytes", vocab_size=257)
    assert len(load_corpus(cfg)) == 20
    with pytest.raises(ConfigError, match="dataset.split 'test' is not in the saved dataset; it has train"):
        load_corpus(DatasetConfig(source="disk", path=str(saved), split="test"))


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


def test_batch_order_shards_ranks_disjointly():
    ranks = [BatchOrder(64, 4, 2, r, seed=0) for r in range(2)]
    for _ in range(8):
        r0, r1 = ranks[0].next(), ranks[1].next()
        assert not set(r0.tolist()) & set(r1.tolist())


def test_corpus_too_small_for_one_global_batch():
    with pytest.raises(ConfigError, match="fewer than one global micro batch"):
        BatchOrder(5, 4, 2, 0, seed=0)
