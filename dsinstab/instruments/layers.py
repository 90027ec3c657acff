"""Which layer a parameter or module belongs to: the grouping every per-layer metric uses."""

from __future__ import annotations

import re

LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)(?:\.|$)")  # llama/qwen3 `layers.<i>`, gpt2 `h.<i>`


def layer_of(name: str) -> str:
    """``layer_<i>`` for a block and everything in it; ``embed`` for embeddings, final norm and head."""
    m = LAYER_RE.search(name)
    return f"layer_{m.group(1)}" if m else "embed"


def layer_order(group: str) -> tuple[int, int]:
    """Sort key: ``embed`` first, then the blocks by number."""
    return (0, 0) if group == "embed" else (1, int(group.split("_")[1]))
