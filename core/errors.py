"""The one exception base for user mistakes, and the one "did you mean" helper.

Every bad input (a YAML typo, an impossible range, a missing dataset, a folder that is not a run)
becomes a `UserError` whose text is one line: where it came from (file, then dotted key), what is
wrong, and the fix. The CLI prints that line and exits with status 2, before any work starts; it
catches nothing else. Layers subclass it to say which layer refused (models.ModelError,
tuning.data.DataError, results.ReportError); a checkpoint that cannot be read is a CheckpointError.
"""
from __future__ import annotations

__all__ = ["UserError", "CheckpointError", "nearest", "one_line", "first_line", "short_repr"]

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """A user mistake. `str(err)` is the one-line message: `file: key: message` (parts left out when
    unknown)."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.message, self.file, self.key = message, file, key
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(one_line(f"{where}: {message}" if where else message))

    def at(self, *, file: str | None = None, key: str | None = None) -> UserError:
        """The same mistake with its location filled in where it was not known yet (same class)."""
        err = type(self).__new__(type(self))
        UserError.__init__(err, self.message, file=self.file or file, key=self.key or key)
        return err

    def __reduce__(self):   # picklable across processes (data-parallel ranks, Ray workers)
        return _rebuild, (type(self), self.message, self.file, self.key)


# Characters str.splitlines() breaks a line at (a key or value from a hostile file may hold them).
_BREAKS = {c: repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(text: str) -> str:
    """text with every line-breaking character written as its escape (\\n, \\x85, ...)."""
    return text.translate(str.maketrans(_BREAKS)) if any(c in text for c in _BREAKS) else text


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters ("" when it has none): what a
    one-line error quotes of a library's multi-line message."""
    text = str(e)
    return text.splitlines()[0][:limit] if text else ""


def short_repr(value, limit: int = 80) -> str:
    """repr of a value, cut to one short line (a hostile file's values can be huge)."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _rebuild(cls, message, file, key):
    err = cls.__new__(cls)
    UserError.__init__(err, message, file=file, key=key)
    return err


class CheckpointError(UserError):
    """A checkpoint file that is missing, corrupt or not gatetune's; resuming falls back to an earlier one."""


def nearest(word, options: Iterable, n: int = 3) -> str:
    """"did you mean 'x'?" for the closest options, or "valid: a, b, ..." when none is close."""
    options = list(dict.fromkeys(str(o) for o in options))
    close = difflib.get_close_matches(str(word), options, n=n, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    shown = ", ".join(options[:12]) + (", ..." if len(options) > 12 else "")
    return f"valid: {shown}"
