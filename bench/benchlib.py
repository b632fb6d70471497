"""What every bench/ script shares: the environment a local Ray gets, the command line's common options
(--device, with a one-line refusal of cuda where there is none; --quick; --verbose) and the final
machine-readable line, `bench NAME: ratio=R goal=G met=yes|no key=value ...` (tests/test_bench.py parses it).

The scripts run as `python bench/NAME.py`, so this folder is sys.path[0] and `import benchlib` finds this file:

    import benchlib
    benchlib.ray_environment()          # before anything imports ray
    ...
    ap = benchlib.parser("overhead", __doc__, quick="smoke run: ...")
    a = ap.parse_args()                 # --device cuda without CUDA: one line on stderr, exit status 1
    ...
    benchlib.final_line("overhead", f"{ratio:.2f}", GOAL, ratio <= GOAL, trials=n, device=None)
"""
from __future__ import annotations

import argparse
import os
import re
import sys


def ray_environment(dedup_logs: bool = False) -> None:
    """Defaults for a local Ray started by a bench (an already set variable wins), as tests/conftest.py
    sets them: no token auth (a local ray.init() would write ~/.ray/auth_token); unless `dedup_logs`, Ray
    does not fold repeated log lines of its workers into one."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not dedup_logs:
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def require_cuda(name: str) -> None:
    """Stop with one line on stderr (exit status 1) when torch sees no CUDA device."""
    import torch
    if not torch.cuda.is_available():
        sys.exit(f"bench {name}: --device cuda, but torch {torch.__version__} sees no CUDA device; "
                 "run it on a GPU machine or pass --device cpu")


def device_name(device: str) -> str:
    """The GPU's name, or `CPU <n> cores`, for a bench's first line."""
    import torch
    return torch.cuda.get_device_name(0) if device == "cuda" else f"CPU {os.cpu_count()} cores"


def start_ray(device: str) -> None:
    """A local Ray with one trial's device: the GPU, or one CPU (and a 200 MiB object store); no dashboard,
    the workers' output kept out of the bench's."""
    import ray
    if device == "cuda":
        ray.init(include_dashboard=False, address="local", log_to_driver=False, num_gpus=1)
    else:
        ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, address="local", log_to_driver=False,
                 object_store_memory=200 * 1024 ** 2)


class BenchParser(argparse.ArgumentParser):
    """An ArgumentParser whose parse_args refuses `--device cuda` on a machine without CUDA (one line)."""

    def __init__(self, name: str, **kwargs):
        super().__init__(**kwargs)
        self.bench = name

    def parse_args(self, args=None, namespace=None):
        a = super().parse_args(args, namespace)
        if getattr(a, "device", None) == "cuda":
            require_cuda(self.bench)
        return a


def parser(name: str, doc: str, *, device: str = "cpu", device_help: str | None = None,
           quick: str | None = None, verbose: bool = False) -> BenchParser:
    """The bench's parser, described by the first line of its docstring, with `--device {cpu,cuda}`
    (default `device`), `--quick` when `quick` (its help) is given, and `--verbose` ("show the searches'
    own output") when asked. The script adds its own options."""
    ap = BenchParser(name, description=doc.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=device, help=device_help)
    if quick is not None:
        ap.add_argument("--quick", action="store_true", help=quick)
    if verbose:
        ap.add_argument("--verbose", action="store_true", help="show the searches' own output")
    return ap


_TOKEN = re.compile(r"[^\s=]+")


def _text(value) -> str:
    if isinstance(value, bool) or getattr(value, "dtype", None) == bool:   # numpy's bool_ too
        return "yes" if value else "no"
    return str(value)


def final_line(name: str, ratio, goal, met: bool, /, **items) -> str:
    """Print (and return) `bench NAME: ratio=R goal=G met=yes|no k=v ...`: ratio, goal and the values as
    str() writes them (so format figures before: f"{x:.2f}"), booleans as yes/no, items in the order given,
    an item whose value is None left out. Keys and values must be single words (the line is split on spaces)."""
    fields = {"ratio": ratio, "goal": goal, "met": bool(met), **{k: v for k, v in items.items() if v is not None}}
    parts = []
    for key, value in fields.items():
        text = _text(value)
        if not _TOKEN.fullmatch(key) or not re.fullmatch(r"\S+", text):
            raise ValueError(f"bench {name}: {key}={text!r} is not one word: the final line would not parse")
        parts.append(f"{key}={text}")
    line = f"bench {name}: " + " ".join(parts)
    print(line)
    return line
