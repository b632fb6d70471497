"""Reading config files: YAML with `_import` inheritance, the notebook's Mayo files, dotted overrides.

    raw, sources, notices = read_config("search_spaces/digits.yaml", ["train.epochs=3"])

A file may extend others with `_import: base.yaml` (paths relative to the importing file; the child's
keys override the parent's, dicts merge, lists and `space:` entries replace). Overrides are dotted keys
with YAML values, as in the 2018 notebook (`train.epochs=3 gating.gate=[conv1,conv2]`). `sources`
records which file (or override) set each dotted key, so a later error names it. Nothing here checks
the values: validate.py does.

Hostile files end in one UserError line, never a hang: a file over MAX_BYTES, or whose anchors and
aliases expand to more than MAX_NODES YAML nodes (a few hundred bytes can expand to gigabytes),
recursive aliases, and nesting deeper than Python's recursion limit.
"""
from __future__ import annotations

__all__ = ["read_config", "read_file", "merge", "parse_override", "yaml_load", "MAX_BYTES", "MAX_NODES", "MAX_DEPTH"]

import collections.abc
import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from gatetune.core.dotted import get_dotted, set_dotted
from gatetune.core.errors import UserError
from gatetune.tuning.config import mayo

MAX_BYTES = 1 << 20       # a config file larger than 1 MiB is refused
MAX_NODES = 100_000       # ... and one whose aliases expand to more YAML nodes than this
MAX_DEPTH = 32            # ... or that nests mappings and lists deeper than this (configs use 5)


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML keeps the last one silently), alias bombs and
    recursive aliases, and reads 1e-6 as a float (YAML 1.1 wants 1.0e-6; everyone writes 1e-6)."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            size = _expanded_size(node, {}, set())
            if size > MAX_NODES:
                raise yaml.YAMLError(f"the document expands to {size:,} YAML nodes through its anchors and "
                                     f"aliases (at most {MAX_NODES:,})")
            if _depth(node, {}) > MAX_DEPTH:
                raise yaml.YAMLError(f"mappings and lists are nested more than {MAX_DEPTH} levels deep")
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue   # `<<: *anchor` (merge keys): the explicit keys beside it override, by design
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, collections.abc.Hashable):
                break   # PyYAML's own check reports "found unhashable key"
            if key in seen and key != "<<":
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (the second would silently replace the first)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _expanded_size(node, memo: dict, open_: set) -> int:
    """YAML nodes in the document once every alias is expanded (shared nodes counted per use)."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_:
        raise yaml.YAMLError("an alias refers to a node that contains it (a recursive structure)")
    open_.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        n = 1 + sum(_expanded_size(c, memo, open_) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n = 1 + sum(_expanded_size(k, memo, open_) + _expanded_size(v, memo, open_) for k, v in node.value)
    else:
        n = 1
    open_.discard(id(node))
    memo[id(node)] = n
    return n


def _depth(node, memo: dict) -> int:
    if id(node) not in memo:
        children = [c for kv in node.value for c in (kv if isinstance(kv, tuple) else (kv,))] \
            if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)) else []
        memo[id(node)] = 1 + max((_depth(c, memo) for c in children), default=0)
    return memo[id(node)]


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _parse(path: Path) -> Any:
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"the file is {path.stat().st_size:,} bytes; a config is at most {MAX_BYTES:,}: "
                        "give the YAML config, not a data file", file=str(path))
    try:
        text = path.read_text(encoding="utf-8")
        return yaml_load(text)
    except UnicodeDecodeError:
        raise UserError("not a text file (binary?); give a YAML config", file=str(path)) from None
    except RecursionError:
        raise UserError("YAML nested too deeply; flatten the file", file=str(path)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = "; ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p) \
            or str(e).splitlines()[0]
        fix = "fix the YAML"
        if text.lstrip().startswith("--") and not text.lstrip().startswith("---"):
            fix = "the first line `--` is not a YAML document marker: write `---` or delete it"
        raise UserError(f"YAML syntax error{at}: {problem}; {fix}", file=str(path)) from None


def _read_yaml(path: Path, chain: tuple[Path, ...], notices: list[str]) -> tuple[dict, dict[str, str]]:
    """(merged dict, {dotted key: file that set it}) for `path` and everything it imports. Notices
    (things done on the user's behalf) are appended to `notices`, to print once all is valid."""
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise UserError(f"_import cycle: {cycle}; remove one of these imports", file=str(chain[-1]), key="_import")
    if not path.is_file():
        where = str(chain[-1]) if chain else None
        raise UserError(f"file not found: {path}; check the path", file=where, key="_import" if chain else None)
    data = _parse(path)
    if data is None:
        raise UserError("the file is empty; give at least `model:` or `_import:`", file=str(path))
    if not isinstance(data, dict):
        raise UserError(f"expected a mapping of keys at the top level, got {type(data).__name__}", file=str(path))
    merged, sources = {}, {}
    imports = data.pop("_import", None)
    mayo_file = mayo.is_mayo(data)
    if imports is not None and not isinstance(imports, (str, list)):
        raise UserError(f"_import must be a file name or a list of them, got {imports!r}", file=str(path),
                        key="_import")
    for imp in [imports] if isinstance(imports, str) else (imports or []):
        if not isinstance(imp, str):
            raise UserError(f"_import must be a file name or a list of them, got {imp!r}", file=str(path),
                            key="_import")
        target = (path.parent / imp).resolve()
        if mayo_file and not target.exists():
            # The notebook's files import Mayo's model definition; gatetune's model.name replaces it.
            notices.append(f"notice: {_rel(str(path))}: _import {imp} (a Mayo model file) not found; using "
                           f"gatetune's built-in {(data.get('model') or {}).get('name')!r} (model.name)")
            continue
        parent, parent_src = _read_yaml(target, (*chain, path), notices)
        merge(merged, parent)
        sources.update(parent_src)
    if mayo_file:
        data = mayo.translate(data, str(path))
    merge(merged, data)
    sources.update({k: str(path) for k in _dotted_keys(data)})
    return merged, sources


def read_file(path: str | os.PathLike, notices: list[str] | None = None) -> dict:
    """One YAML config file with its imports (and a Mayo gating file translated), unvalidated."""
    return _read_yaml(Path(path).resolve(), (), [] if notices is None else notices)[0]


def read_config(path: str | os.PathLike, overrides=()) -> tuple[dict, dict[str, str], list[str]]:
    """(raw nested dict, {dotted key: file or override that set it}, notices) of a config file with its
    imports and the command line's dotted overrides applied. `name` defaults to the file's stem."""
    path = Path(path)
    notices: list[str] = []
    raw, sources = _read_yaml(path.resolve(), (), notices)
    sources = {k: str(path) if v == str(path.resolve()) else _rel(v) for k, v in sources.items()}
    for text in overrides:
        key, value = parse_override(text)
        where = f"command line override {text!r}"
        try:
            set_dotted(raw, key, value)
        except UserError as e:
            raise e.at(file=where) from None
        sources[key] = where
        if key.startswith("train.phases") and isinstance(get_dotted(raw, "train"), dict):
            raw["train"].pop("epochs", None)   # re-derived from the phases
            sources.pop("train.epochs", None)
    raw.setdefault("name", path.stem)
    return raw, sources, notices


def merge(dst: dict, src: dict, whole: bool = False) -> None:
    """Deep-merge `src` into `dst` as `_import` does: dicts merge; lists, scalars and each `space:`
    entry replace."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict) and not whole:
            merge(dst[k], v, whole=k == "space")
        else:
            dst[k] = copy.deepcopy(v)


def _dotted_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, dict) and k != "space":
            out += _dotted_keys(v, key + ".")
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`train.epochs=3` -> ("train.epochs", 3); the value is parsed as YAML (lists, numbers, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")) or " " in key:
        raise UserError(f"malformed override {text!r}; write dotted.key=value, e.g. train.epochs=3",
                        file="command line")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError) as e:
        why = str(e).splitlines()[0] if isinstance(e, yaml.YAMLError) and ("expands to" in str(e) or "nested" in str(e)) \
            else "the value is not valid YAML"
        raise UserError(f"override {text!r}: {why}; quote it or fix the brackets",
                        file="command line", key=key) from None
    return key, value


def _rel(p: str) -> str:
    try:
        return os.path.relpath(p)
    except ValueError:
        return p
