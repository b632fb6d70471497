"""The error the models package raises for user mistakes (a gatetune.core UserError)."""
from __future__ import annotations

from gatetune.core.errors import UserError, nearest

__all__ = ["ModelError", "nearest"]


class ModelError(UserError):
    """A user mistake in model, site, policy or weights: one line naming the bad value, the nearest
    valid options and the fix. Raised before any work (building, loading) starts where possible.
    Callers that know which config key the value came from add it with `err.at(key=...)`."""
