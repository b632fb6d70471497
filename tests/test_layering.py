"""The package's shape, checked: imports point one way between packages (cli -> search -> train -> config ->
data -> models/results -> core), only the search stack imports Ray or Optuna, no module reaches into another
module's private names, and no file is huge."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"core": "gatetune.core", "models": "gatetune.models", "tuning": "gatetune.tuning",
            "results": "gatetune.results"}
# A module may import gatetune modules of its own package and of packages of a strictly lower rank; a
# package's __init__ may also re-export its own subpackages (models re-exports models.inference).
RANK = {"gatetune.core": 0,
        "gatetune.models": 1, "gatetune.results": 1,
        "gatetune.models.inference": 2, "gatetune.tuning.data": 2,
        "gatetune.tuning.config": 3,
        "gatetune.tuning.train": 4,
        "gatetune.tuning.search": 5,
        "gatetune.tuning": 6}
# The only package that may import these (anywhere, also inside a function).
SEARCH_ONLY = ("ray", "optuna")


def _modules():
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            yield path, ".".join([package, *parts])


def _unit(module: str) -> str:
    """The ranked unit a module belongs to (its longest prefix in RANK)."""
    return max((k for k in RANK if module == k or module.startswith(k + ".")), key=len)


def _imports(tree: ast.AST, module: str):
    """(imported gatetune module, line) for every import outside `if TYPE_CHECKING:` blocks."""
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names if a.name.startswith("gatetune."))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against this module's package
                pkg = module.split(".")[:len(module.split(".")) - node.level + (1 if _is_package(module) else 0)]
                base = ".".join([*pkg, *([base] if base else [])])
            if base.startswith("gatetune"):
                for a in node.names:
                    full = f"{base}.{a.name}"
                    yield (full if any(u == full or full.startswith(u + ".") for u in RANK) else base), node.lineno


def _is_package(module: str) -> bool:
    return any(p.name == "__init__.py" and m == module for p, m in _modules())


@pytest.mark.parametrize("path, module", list(_modules()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_imports_point_one_way(path, module):
    tree = ast.parse(path.read_text())
    mine = _unit(module)
    for target, line in _imports(tree, module):
        theirs = _unit(target)
        if theirs == mine or RANK[theirs] < RANK[mine] or (_is_package(module) and target.startswith(module + ".")):
            continue
        pytest.fail(f"{path.relative_to(ROOT)}:{line}: {module} imports {target} (rank {RANK[theirs]} >= "
                    f"{RANK[mine]}); imports must point down: cli -> search -> ... -> core")


def _third_party(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((a.name.split(".")[0], node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module.split(".")[0], node.lineno


@pytest.mark.parametrize("path, module", list(_modules()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_only_the_search_stack_imports_ray_and_optuna(path, module):
    """The training stack (tuning.train, gatetune train), the models, the config and the report run without
    Ray's or Optuna's import; tuning.search is where a search's engine lives."""
    if _unit(module) == "gatetune.tuning.search":
        return
    for name, line in _third_party(ast.parse(path.read_text())):
        assert name not in SEARCH_ONLY, (f"{path.relative_to(ROOT)}:{line}: {module} imports {name}; only "
                                         "tuning/search/ may (move the code there, or pass what it needs in)")


def test_every_package_is_ranked():
    """Each folder with an __init__.py is ranked or inside a ranked one (a new package gets a place)."""
    for path, module in _modules():
        if path.name == "__init__.py":
            assert _unit(module), module
    units = {_unit(m) for _, m in _modules()}
    assert units == set(RANK), f"ranked but holding no module: {set(RANK) - units}"


def _all_files():
    for folder in (*PACKAGES, "bench", "tests"):
        yield from sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", list(_all_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_of_other_modules(path):
    """`from x import _y` and `x._y` (x a gatetune module) only inside x itself."""
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and ((node.module or "").startswith("gatetune") or node.level):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno}: imports private {a.name} from "
                                f"{node.module}; make it public (and documented) or keep it where it is")
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("gatetune"):
                    aliases[a.asname or a.name.split(".")[0]] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno}: uses private {node.value.id}.{node.attr}")


@pytest.mark.parametrize("folder", ["core", "models", "tuning", "results"])
def test_no_file_is_huge(folder):
    big = {str(p.relative_to(ROOT)): n for p in (ROOT / folder).rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 360}
    assert not big, f"split these into modules with one job each: {big}"


def test_one_did_you_mean_helper():
    defs = [str(p.relative_to(ROOT)) for p in _all_files() if "def " + "nearest(" in p.read_text()]
    assert defs == ["core/errors.py"], defs
