"""The bad-input corpus: every file in tests/bad_inputs/ is one user mistake, and each one must end as
ONE line on stderr (`gatetune <cmd>: error: <file>: <key>: <problem>; <fix>`) with exit status 2,
before any work starts (no run folder, no Ray, no training).

A case file starts with header comment lines (the leading block of `#` lines):

    # expect: <substring of the error line>        one or more
    # command: train|search                        default train
    # overrides: key=value 'key2=value with spaces' dotted overrides (shell-style quoting)
    # key: <dotted key the line must name>
    # file: <name the line must hold instead of the case's own file>  (an error inside an imported file)
    # needs: no-cuda                               skip the case where CUDA is available
    # xfail: <reason>                              a known product bug (strict: fixing it flips the case)

Descriptive comments in the header use `# -- text`. Files without a header (an empty file) take their
header from HEADERLESS below. parts/ holds files the cases import; it is not itself a case.
"""
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).resolve().parent / "bad_inputs"
HEADER_KEYS = {"expect", "command", "overrides", "key", "file", "needs", "xfail"}
HEADERLESS = {"empty.yaml": {"expect": ["the file is empty"]}}   # a 0-byte file cannot hold a header


class WorkStarted(Exception):
    """Raised by the stubs of train_run / Ray start-up: the bad input was not rejected up front."""


def _case_files() -> list[Path]:
    return sorted(p for p in CASES.iterdir() if p.is_file() and not p.name.startswith((".", "README")))


def _header(path: Path) -> dict:
    """The leading `# key: value` lines, as {key: [values]}. Binary files: only the text header is read."""
    head: dict[str, list[str]] = {}
    for raw in path.read_bytes().split(b"\n"):
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*(\w+):\s?(.*)$", line)
        if m is None or line.startswith("# --"):
            continue
        if m.group(1) not in HEADER_KEYS:
            raise ValueError(f"{path.name}: unknown header key {m.group(1)!r} (valid: {sorted(HEADER_KEYS)})")
        head.setdefault(m.group(1), []).append(m.group(2).strip())
    if not head:
        head = HEADERLESS.get(path.name, {})
    if not head.get("expect"):
        raise ValueError(f"{path.name}: no `# expect:` header line (and not listed in HEADERLESS)")
    return head


def _params():
    out = []
    for path in _case_files():
        head = _header(path)
        marks = [pytest.mark.timeout(30)]
        if "xfail" in head:
            marks.append(pytest.mark.xfail(strict=True, reason=head["xfail"][0]))
        if "no-cuda" in head.get("needs", []):
            import torch
            marks.append(pytest.mark.skipif(torch.cuda.is_available(), reason="case needs a machine without CUDA"))
        out.append(pytest.param(path, head, id=path.name, marks=marks))
    return out


def test_corpus_is_large_enough():
    files = _case_files()
    assert len(files) >= 30, [p.name for p in files]
    assert all(p.stat().st_size < 2048 for p in files), "keep case files small"


@pytest.fixture
def no_work(monkeypatch):
    """Anything that gets past validation hits a stub instead of training for minutes or starting Ray."""
    import gatetune.tuning.search.cluster as cluster_mod
    import gatetune.tuning.train.run as run_mod

    def stub(*args, **kwargs):
        raise WorkStarted("the input was accepted and work started")

    monkeypatch.setattr(run_mod, "train_run", stub)
    monkeypatch.setattr(cluster_mod, "connect", stub)
    monkeypatch.chdir(ROOT)   # relative paths in cases (model.weights) resolve against the repository root


@pytest.mark.parametrize("path, head", _params())
def test_bad_input_is_one_line_exit_2(path, head, tmp_path, capsys, no_work):
    from gatetune.tuning.cli import main

    command = (head.get("command") or ["train"])[0]
    assert command in ("train", "search"), command
    overrides = [tok for o in head.get("overrides", []) for tok in shlex.split(o)]
    out = tmp_path / "out"
    argv = [command, str(path), *overrides, "--out" if command == "train" else "--storage", str(out)]
    try:
        rc = main(argv)
    except WorkStarted:
        pytest.fail(f"no error: `gatetune {' '.join(argv)}` got past validation and started work")
    except SystemExit as e:    # argparse
        rc = e.code
    except Exception as e:     # would be a traceback and exit 1 on the command line
        pytest.fail(f"uncaught {type(e).__name__}: {e}")

    err = capsys.readouterr().err
    lines = err.strip("\n").splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].strip(), f"expected exactly one line on stderr, got: {err!r}"
    line = lines[0]
    assert "Traceback" not in line, line
    assert line.startswith(f"gatetune {command}: error: "), line
    if overrides:   # the line names the command-line override, not the (valid) file
        assert "command line" in line and any(o in line for o in overrides), line
    else:
        names = [head["file"][0]] if "file" in head else [str(path), path.name]
        assert any(n in line for n in names), f"the line does not name {names[-1]}: {line}"
    for want in head["expect"]:
        assert want in line, f"{want!r} missing from: {line}"
    if "key" in head:
        assert head["key"][0] in line, f"key {head['key'][0]!r} missing from: {line}"
    assert not out.exists(), f"{out} was created"
