"""The one exception type for user mistakes.

Every bad input (a YAML typo, an impossible range, a missing dataset) becomes a `ConfigError` whose
message is one line: where it came from (file and key), what is wrong, and the fix. The CLI prints
that line and exits with status 2, before any work starts; nothing else is caught.
"""
from __future__ import annotations

__all__ = ["ConfigError", "nearest"]

import difflib


class ConfigError(ValueError):
    """A user mistake. `str(err)` is the one-line message the CLI prints."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.message = file, key, message
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


def nearest(word: str, options, n: int = 3) -> str:
    """' (did you mean 'x'?)' for the closest option, or a list of the options when none is close."""
    options = [str(o) for o in options]
    close = difflib.get_close_matches(str(word), options, n=n, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    shown = ", ".join(options[:12]) + (", ..." if len(options) > 12 else "")
    return f"valid: {shown}"
