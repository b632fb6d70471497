"""The per-machine cache folder: what gatetune derives once and reuses (the compiled gate kernel and the
inference variant choices of models/inference/, the decoded image folders of tuning/data/). Deleting it costs time only."""
from __future__ import annotations

__all__ = ["cache_dir"]

import os


def cache_dir(*parts: str) -> str:
    """$GATETUNE_CACHE_DIR, else ~/.cache/gatetune, joined with `parts` (created on demand by the writers)."""
    root = os.environ.get("GATETUNE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gatetune")
    return os.path.join(root, *parts)
