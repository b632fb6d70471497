"""The variant each site of the channel-skipping path runs, chosen by measured cost and cached per machine.

A gated site of a SkipNet can run several ways that compute the same output (models/inference/skip.py): skip the
suppressed channels (convolve only the kept output channels over the non-zero input channels) or run the
dense conv and keep the winners, each with torch's default conv or oneDNN (mkldnn) forced. Which is
fastest depends on the shapes, the density, the CPU and the thread count, so the first time a site meets
an input shape it times its variants on that very input (interleaved, median; `calibrate`) and keeps the
fastest. Choices are remembered per process and in a JSON file under core.cache.cache_dir()
(choices-<hash>.json, one per torch version, CPU model and kernel build), keyed by a signature of the site's
shapes, the input shape and the thread count, so later runs on this machine reuse them without timing.
GATETUNE_CHOICE_CACHE=0 keeps choices in memory only; deleting the file makes the next run measure again.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch

from gatetune.core.cache import cache_dir
from gatetune.core.storage import write_atomic
from gatetune.models.inference.kernel import SOURCE, cpu_name

__all__ = ["calibrate", "cached_choice", "choose", "choice_file", "time_call", "timed"]

_LOCK = threading.Lock()
_MEMORY: dict[str, dict] = {}
_LOADED: list[str] = []   # the choice file read into _MEMORY, once


def choice_file() -> str:
    """The choice file of this machine, torch version and kernel source."""
    key = "\0".join([torch.__version__, cpu_name(), hashlib.sha256(SOURCE.encode()).hexdigest()])
    return os.path.join(cache_dir(), f"choices-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")


def _persist() -> bool:
    return os.environ.get("GATETUNE_CHOICE_CACHE", "1") not in ("0", "", "false", "no")


def _read(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_choice(signature: str) -> str | None:
    """The variant chosen earlier for `signature` (this process, or the choice file), else None."""
    with _LOCK:
        if _persist() and not _LOADED:
            path = choice_file()
            for sig, entry in _read(path).items():
                _MEMORY.setdefault(sig, entry)
            _LOADED.append(path)
        entry = _MEMORY.get(signature)
    return entry.get("choice") if isinstance(entry, dict) else None


def _record(signature: str, entry: dict) -> None:
    with _LOCK:
        _MEMORY[signature] = entry
        if not _persist():
            return
        path = choice_file()
        try:
            data = _read(path)   # merge: another process may have added entries meanwhile
            data[signature] = entry
            text = json.dumps(data, indent=0, sort_keys=True).encode()
            write_atomic(path, lambda f: f.write(text))
        except OSError:
            pass   # a read-only home: the choice still holds for this process


def timed(fn: Callable[[], object], sync: bool = False) -> tuple[object, float]:
    """(fn(), seconds the call took), with a CUDA synchronize before and after when sync."""
    if sync:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if sync:
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def time_call(fn: Callable[[], object], sync: bool = False) -> float:
    """Seconds one call of fn takes (with a CUDA synchronize before and after when sync)."""
    return timed(fn, sync)[1]


def calibrate(signature: str, variants: dict[str, Callable[[], object]], *, sync: bool = False,
              warmup: int = 2, reps: int = 9) -> str:
    """The name of the fastest of `variants` (zero-argument calls computing the same thing) for
    `signature`: the cached choice when there is one, else each is timed `reps` times, interleaved call by
    call after `warmup` untimed rounds, and the lowest median wins (and is cached)."""
    if len(variants) == 1:
        return next(iter(variants))
    choice = cached_choice(signature)
    if choice in variants:
        return choice
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(warmup + reps):
        for name, fn in variants.items():
            dt = time_call(fn, sync)
            if r >= warmup:
                times[name].append(dt)
    return choose(signature, times)


def choose(signature: str, times: dict[str, list[float]], where: str = "isolated") -> str:
    """The variant of lowest median time in `times` (name -> seconds per call; a variant without samples
    never wins), cached for `signature` with its medians and `where` they were measured."""
    us = {name: round(1e6 * statistics.median(v), 2) if v else float("inf") for name, v in times.items()}
    choice = min(us, key=us.get)
    _record(signature, {"choice": choice, "us": {n: v for n, v in us.items() if v != float("inf")},
                        "measured": where})
    return choice
