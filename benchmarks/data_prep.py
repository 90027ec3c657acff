"""Prepare generated local text corpora of several sizes: tokens/s and peak RSS of each.

    python benchmarks/data_prep.py                          # 250 MB and 1 GB, bytes tokenizer
    python benchmarks/data_prep.py --sizes 250 1000 --tokenizers bytes bpe --num-proc 2

Each corpus is written to a temporary folder as ~10 MB text files (one document each, like a
folder of books), prepared by ``dsinstab.run.data.prepare_data`` in a fresh child process with a cold
cache, then deleted. Peak RSS is the child's (or, if larger, one of its tokenizer processes')
``ru_maxrss``. The point is that it does not grow with the corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FILE_MB = 10


def make_corpus(folder: Path, size_mb: int, seed: int = 0) -> int:
    """Pseudo-English (Zipf-distributed words of a 20k-word vocabulary, 12 words a line) in files of
    ``FILE_MB`` (smaller for a small corpus) until ``size_mb`` MB are written; returns the bytes written."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    lengths = rng.integers(2, 11, size=20_000)
    vocab = np.array(["".join(rng.choice(letters, n)) for n in lengths], dtype=object)
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    folder.mkdir(parents=True, exist_ok=True)
    written, i = 0, 0
    while written < size_mb * 1e6:
        file_bytes = min(FILE_MB * 1e6, size_mb * 1e6 / 8, size_mb * 1e6 - written)  # 8 files at least
        n_words = int(file_bytes) // 7 + 12  # ~7 bytes a word
        words = vocab[rng.choice(len(vocab), size=n_words, p=p)]
        lines = words[: len(words) // 12 * 12].reshape(-1, 12)
        text = "\n".join(" ".join(line) for line in lines) + "\n"
        path = folder / f"{i:05d}.txt"
        path.write_text(text)
        written, i = written + path.stat().st_size, i + 1
    return written


def _child(spec: dict) -> dict:
    """Runs in the fresh child: prepare, then report time, tokens and the peak RSS."""
    from dsinstab.run.config import DatasetConfig
    from dsinstab.run.data import prepare_data

    dc = DatasetConfig(
        source="local",
        path=spec["corpus"],
        tokenizer=spec["tokenizer"],
        vocab_size=257 if spec["tokenizer"] == "bytes" else 4096,
        num_proc=spec["num_proc"],
    )
    start = time.perf_counter()
    data = prepare_data(dc, spec["seq_len"], spec["cache"], log=lambda m: None, progress=False)
    seconds = time.perf_counter() - start
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    tokens = (len(data.train) + len(data.validation)) * (spec["seq_len"] + 1)
    return {"seconds": seconds, "tokens": tokens, "peak_rss_mb": peak / 1024}


def prepare_in_child(corpus: Path, cache: Path, tokenizer: str, seq_len: int, num_proc: int) -> dict:
    spec = {
        "corpus": str(corpus),
        "cache": str(cache),
        "tokenizer": tokenizer,
        "seq_len": seq_len,
        "num_proc": num_proc,
    }
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def corpus_rows(
    sizes_mb: list[int],
    tokenizers: tuple[str, ...] = ("bytes",),
    num_proc: int | None = None,
    seq_len: int = 1024,
) -> list[dict]:
    """One row per corpus size and tokenizer: prepared in a fresh child with a cold cache."""
    num_proc = num_proc or os.cpu_count() or 1
    rows = []
    for size in sizes_mb:
        work = Path(tempfile.mkdtemp(prefix="dsinstab-data-prep-"))
        try:
            written = make_corpus(work / "corpus", size)
            for tokenizer in tokenizers:
                r = prepare_in_child(
                    work / "corpus", work / f"cache-{tokenizer}", tokenizer, seq_len, num_proc
                )
                shutil.rmtree(work / f"cache-{tokenizer}", ignore_errors=True)
                rows.append(
                    {
                        "corpus_mb": written / 1e6,
                        "tokenizer": tokenizer,
                        "num_proc": num_proc,
                        "seconds": r["seconds"],
                        "tokens": r["tokens"],
                        "tokens_per_s": r["tokens"] / r["seconds"],
                        "peak_rss_mb": r["peak_rss_mb"],
                    }
                )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| corpus | tokenizer | processes | time | tokens packed | tokens/s | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['corpus_mb']:.0f} MB | {r['tokenizer']} | {r['num_proc']} | {r['seconds']:.0f} s "
            f"| {r['tokens'] / 1e6:.0f}M | {r['tokens_per_s'] / 1e6:.2f}M | {r['peak_rss_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def cpu_line() -> str:
    flags = set()
    model = platform.processor()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return f"{model}, {os.cpu_count()} cores, " + ", ".join(f for f in wanted if f in flags)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[250, 1000], help="corpus sizes in MB")
    p.add_argument("--tokenizers", nargs="+", default=["bytes"], choices=["bytes", "bpe"])
    p.add_argument("--num-proc", type=int, default=None, help="dataset.num_proc (default: every core)")
    p.add_argument("--seq-len", type=int, default=1024, help="model.seq_len: blocks of seq_len + 1 tokens")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    rows = corpus_rows(args.sizes, tuple(args.tokenizers), args.num_proc, args.seq_len)
    print(f"CPU: {cpu_line()}\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
