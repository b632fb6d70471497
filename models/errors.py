"""The one exception the models package raises for user mistakes, and its 'did you mean' helper."""
from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["ModelError", "nearest"]


class ModelError(ValueError):
    """A user mistake in model, site, policy or weights: one line naming the bad value, the nearest
    valid options and the fix. Raised before any work (building, loading) starts where possible."""


def nearest(bad: str, options: Iterable[str], n: int = 3) -> str:
    """'did you mean 'a', 'b'?' for the closest options (difflib), or the first few options when none is close."""
    options = list(dict.fromkeys(options))
    close = difflib.get_close_matches(bad, options, n=n, cutoff=0.6)
    if close:
        return "did you mean " + ", ".join(repr(c) for c in close) + "?"
    shown = ", ".join(options[:8]) + (", ..." if len(options) > 8 else "")
    return f"valid: {shown}"
