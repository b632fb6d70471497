"""Hostile configs: YAML trees near the real schema (wrong types, unknown and misspelt keys, out-of-range
numbers, NaN/inf, deep nesting, unicode, lists where maps go), override strings, `_import` cycles, huge
files, and anchors/aliases that expand a few hundred bytes into gigabytes, through the loader, the
validator and the CLI in-process. Every case ends in a valid config or ONE one-line UserError within
seconds and bounded memory: never another exception, never a hang, never a run folder.

200 generated examples run in `make test`, 5,000 in `make test-slow` (Hypothesis, derandomized so CI
sees the same cases every run)."""
import contextlib
import io
import os
import resource
import tempfile
import time
from pathlib import Path
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatetune.core.errors import UserError
from gatetune.tuning import config as C

ROOT = Path(__file__).resolve().parent.parent
BASE = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
BASE.pop("_import")
BASE = {**yaml.safe_load((ROOT / "search_spaces" / "digits.yaml").read_text()), **BASE}
KEYS = [k.replace(".N.", ".0.") for k in C.config_keys()]
FIELDS = sorted({part for k in KEYS for part in k.split(".") if part != "0"})
WORDS = ["all", "none", "conv1", "conv[2-6]", "fire6", "digits", "sgd", "asha", "fbs", "mse", "grid", "choice",
         "1e-6", "_import", "<<", "~", "-1", "0", "1e400", "NaN", "ünïcødé", "trainbale", "densty", "", " "]
SECONDS = 10          # per case
MEMORY_MB = 1500      # the process's peak resident memory may grow at most this much over all cases

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 20, 10 ** 20),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(WORDS))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=6)), inner,
                                                 max_size=4)), max_leaves=10)


def _misspell(word: str, i: int) -> str:
    return word[:i % (len(word) + 1)] + "x" + word[i % (len(word) + 1) + 1:]


@st.composite
def trees(draw):
    """The quickstart search config with a few keys set to wrong, misspelt, huge or nested values."""
    tree = yaml.safe_load(yaml.safe_dump(BASE))
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(lambda k: _misspell(k, len(k) // 2)),
                             st.text(min_size=1, max_size=10), st.sampled_from(["space.gating.density",
                                                                                "space.train.optimizer.lr", "search"])))
        value = draw(values)
        node, parts = tree, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
            if not isinstance(node, dict):
                break
        if isinstance(node, dict):
            node[parts[-1]] = value
    return tree


overrides = st.lists(st.builds(lambda k, v: f"{k}={v}", st.one_of(st.sampled_from(KEYS), st.text(max_size=10)),
                               st.one_of(values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip()),
                                         st.text(max_size=15))), max_size=3)


def alias_bomb(levels: int, fanout: int) -> str:
    """A few hundred bytes whose anchors and aliases expand to fanout**levels scalars."""
    lines = [f"a0: &a0 [{', '.join(['x'] * fanout)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fanout)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nmodel: {{name: digitnet}}\ngating: {{gate: *a{levels - 1}}}\n"


class WorkStarted(Exception):
    pass


def _run(text: str | bytes, args: list[str], command: str = "train", extra: dict | None = None):
    """gatetune <command> on a config written to a new folder: ("work", None) when it got past validation,
    ("error", line) for a one-line user error; anything else fails the test."""
    from gatetune.tuning.cli import main
    with tempfile.TemporaryDirectory(prefix="gatetune-fuzz-") as tmp:
        path = Path(tmp) / "case.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        for name, body in (extra or {}).items():
            (Path(tmp) / name).write_text(body)
        out = Path(tmp) / "out"
        err = io.StringIO()
        started = time.perf_counter()
        stub = mock.Mock(side_effect=WorkStarted)
        with mock.patch("gatetune.tuning.train.run.train_run", stub), mock.patch("gatetune.tuning.search.cluster.connect", stub), \
                contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main([command, str(path), *args, "--out" if command == "train" else "--storage", str(out)])
            except WorkStarted:
                rc = None
            except SystemExit as e:   # argparse: an override it reads as an option ("-x=1")
                rc = e.code
        elapsed = time.perf_counter() - started
        assert elapsed < SECONDS, f"{elapsed:.1f} s for {text[:200]!r} {args!r}"
        assert not out.exists(), "a run folder was created"
        lines = err.getvalue().strip("\n").splitlines()
        if rc is None:
            return "work", None
        assert rc == 2 and len(lines) == 1, (rc, err.getvalue())
        assert lines[0].startswith((f"gatetune {command}: error: ", "gatetune: error: ")), lines[0]
        assert "Traceback" not in lines[0]
        # the loader and validator alone end the same way: a Config or a UserError
        try:
            C.load(path, args, environment=False)
        except UserError as e:
            assert "\n" not in str(e)
        return "error", lines[0]


@pytest.fixture(scope="module")
def memory():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown < MEMORY_MB, f"peak memory grew {grown:.0f} MB"


def _case(tree, args, command):
    return _run(yaml.safe_dump(tree, allow_unicode=True, sort_keys=False), args, command)


COMMON = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=200, **COMMON)
@given(tree=trees(), args=overrides, command=st.sampled_from(["train", "search"]))
def test_generated_configs_end_in_a_config_or_one_line(tree, args, command, memory):
    _case(tree, args, command)


@pytest.mark.slow
@settings(max_examples=5000, **COMMON)
@given(tree=trees(), args=overrides, command=st.sampled_from(["train", "search"]))
def test_generated_configs_end_in_a_config_or_one_line_5000(tree, args, command, memory):
    _case(tree, args, command)


@settings(max_examples=40, **COMMON)
@given(levels=st.integers(2, 12), fanout=st.integers(2, 12))
def test_alias_bombs_are_refused_quickly(levels, fanout, memory):
    kind, line = _run(alias_bomb(levels, fanout), [])
    if fanout ** levels > 100_000:
        assert kind == "error" and "anchors and aliases" in line, line


@pytest.mark.parametrize("name, text, extra, says", [
    ("the 411-byte bomb of eight levels", alias_bomb(8, 9), None, "expands to"),
    ("deep nesting", "gating: {gate: " + "[" * 200 + "]" * 200 + "}\n", None, "nested"),
    ("recursive alias", "a: &a [*a]\nmodel: {name: digitnet}\n", None, "YAML"),
    ("import cycle", "_import: b.yaml\n", {"b.yaml": "_import: case.yaml\n"}, "_import cycle"),
    ("huge file", "model: {name: digitnet}\n" + "# " + "x" * (1 << 20) + "\n", None, "a config is at most"),
    ("binary", b"\x00\xff\xfe\x00model", None, "not a text file"),
    ("NaN weight", "gating: {weight: .nan}\n", None, "finite"),
    ("infinite lr", "train: {optimizer: {lr: .inf}}\n", None, "finite"),
    ("name escaping the runs folder", "name: ../../etc\n", None, "folder name"),
    ("list where a map goes", "train: [1, 2]\n", None, "train"),
    ("unicode key", "gätïng: {density: 0.5}\n", None, "unknown key"),
    ("huge grid", "search: {}\nspace: {seed: {grid: [" + ", ".join(map(str, range(1001))) + "]}}\n", None,
     "at most 1000"),
])
def test_known_hostile_files(name, text, extra, says, memory):
    kind, line = _run(text, [], "search" if "grid" in name else "train", extra)
    assert kind == "error" and says in line, (name, line)
