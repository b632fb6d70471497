"""docs/design.md's module table is the tree: it lists every module of the four packages, and nothing else."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"


def _table_paths() -> list[str]:
    text = DESIGN.read_text()
    section = text[text.index("### Packages and their modules"):text.index("## Data flow")]
    return re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)


def _tree() -> set[str]:
    out = set()
    for folder in ("core", "models", "tuning", "results"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if path.name != "__init__.py":
                out.add(rel.as_posix())
    return out


def test_the_module_table_lists_every_module_once():
    listed = _table_paths()
    assert len(listed) == len(set(listed)), [p for p in listed if listed.count(p) > 1]
    folders = [p for p in listed if p.endswith("/")]   # a folder row stands for every module inside it
    covered = {p for p in listed if not p.endswith("/")}
    tree = _tree()
    missing = {m for m in tree if m not in covered and not any(m.startswith(f) for f in folders)}
    assert not missing, f"docs/design.md's module table lacks {sorted(missing)}: add a row with its one job"
    gone = sorted(p for p in listed if not (ROOT / p).exists())
    assert not gone, f"docs/design.md's module table lists {gone}, which do not exist: remove or rename the rows"
