"""A run folder where Ray Tune's storage can be: a local (or NFS) path, or a URI pyarrow opens
(s3://bucket/prefix, gs://bucket/prefix, file:///...).

    store = RunStore("s3://gatetune-runs/runs/q1")
    store.write_text("gatetune.yaml", text);  store.read_text("gatetune.yaml")   # atomic, local or remote
    store.append("decisions.jsonl", line)                  # a growing file
    store.prune("trial_x", layout.CHECKPOINT_DIR, keep=2)  # the newest 2 numbered entries stay
    local = store.mirror()       # every file but checkpoint contents, copied into a local folder to read

The search (run folder, decisions, study export, checkpoint pruning), `gatetune train` (its run folder)
and the report all write through it: one atomic write, one append, one prune.

S3 takes its endpoint and credentials from the standard AWS variables (AWS_ENDPOINT_URL or
AWS_ENDPOINT_URL_S3 with its http:// or https://, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION),
GCS from Google's default credentials. Remote objects cannot be appended to, so a growing file is kept
in a local copy and uploaded whole; a write is atomic either way (a local file is written beside and
renamed, an object appears when its upload completes).
"""
from __future__ import annotations

__all__ = ["RunStore", "is_remote", "write_atomic"]

import os
import re
import tempfile
from pathlib import Path

from gatetune.core import layout
from gatetune.core.errors import UserError, first_line


def write_atomic(path: str | os.PathLike, write, *, sync: bool = False) -> None:
    """write(f) into a temporary file beside `path` (its folder created), then renamed over it: a reader
    sees the old file or the whole new one, and a failed write (a full disk: OSError ENOSPC) leaves the old
    one. sync: fsync before the rename (a checkpoint that must survive a power cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_remote(where: str | os.PathLike) -> bool:
    return "://" in str(where)


class RunStore:
    """One run folder, local or remote; paths are relative to it ("trial_x/latency.json")."""

    def __init__(self, where: str | os.PathLike):
        self.where = str(where).rstrip("/") if is_remote(where) else os.path.abspath(str(where))
        self.remote = is_remote(where)
        self._fs = None
        self._appended: dict[str, Path] = {}   # rel -> this process's local copy of a remote file it appends to

    def __str__(self) -> str:
        return self.where

    def __getstate__(self):   # picklable (schedulers and searchers are): the filesystem is reopened
        return {**self.__dict__, "_fs": None, "_appended": {}}

    def _open(self):
        if self._fs is None:
            from pyarrow import fs
            try:
                self._fs, self._root = fs.FileSystem.from_uri(self.where)
            except Exception as e:   # noqa: BLE001  (pyarrow raises ArrowInvalid, OSError, ...)
                raise UserError(f"cannot open it ({_oneline(e)}); check the URI and, for s3://, AWS_ENDPOINT_URL "
                                "and the AWS keys", file=self.where) from None
        return self._fs, self._root

    def local_path(self, rel: str = "") -> Path:
        """The path of `rel` in a local run folder (only for local stores)."""
        assert not self.remote, "a remote run folder has no local path; use mirror()"
        return Path(self.where, rel)

    def uri(self, rel: str = "") -> str:
        return f"{self.where}/{rel}" if rel else self.where

    def exists(self, rel: str = "") -> bool:
        if not self.remote:
            return self.local_path(rel).exists()
        from pyarrow import fs
        filesystem, root = self._open()
        return filesystem.get_file_info(_join(root, rel)).type != fs.FileType.NotFound

    def listdir(self, rel: str = "") -> list[str]:
        """Names of the entries right below `rel` (sorted; [] when it does not exist)."""
        if not self.remote:
            folder = self.local_path(rel)
            return sorted(os.listdir(folder)) if folder.is_dir() else []
        from pyarrow import fs
        filesystem, root = self._open()
        try:
            found = filesystem.get_file_info(fs.FileSelector(_join(root, rel)))
        except FileNotFoundError:
            return []
        return sorted(f.path.rstrip("/").rsplit("/", 1)[-1] for f in found)

    def read_bytes(self, rel: str) -> bytes:
        if not self.remote:
            return self.local_path(rel).read_bytes()
        filesystem, root = self._open()
        with filesystem.open_input_stream(_join(root, rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        if not self.remote:
            write_atomic(self.local_path(rel), lambda f: f.write(data))
            return
        filesystem, root = self._open()
        with filesystem.open_output_stream(_join(root, rel)) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def upload(self, local: str | os.PathLike, rel: str) -> None:
        self.write_bytes(rel, Path(local).read_bytes())

    def append(self, rel: str, text: str) -> None:
        """Add `text` at the end of `rel` (created if missing). An object store cannot append: the file is
        kept in a local copy (started from the remote one, so a resumed search keeps the earlier lines) and
        uploaded whole each time."""
        if not self.remote:
            path = self.local_path(rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(text)
            return
        copy = self._appended.get(rel)
        if copy is None:
            fd, name = tempfile.mkstemp(prefix="gatetune-append-")
            os.close(fd)
            copy = Path(name)
            if self.exists(rel):
                self.download(rel, copy)
            self._appended[rel] = copy
        with open(copy, "a") as f:
            f.write(text)
        self.upload(copy, rel)

    def prune(self, rel: str, pattern: re.Pattern, keep: int, below: int | None = None,
              newest: int | None = None) -> list[str]:
        """Delete all but the newest `keep` entries (files or folders) right below `rel` whose names match
        `pattern` in full, newest by the number of its first group, and only those numbered under `below` when
        given; entries numbered above `newest`, when given, neither count nor go (a folder not recorded yet,
        or an upload cut short, must not push out the newest good one); returns the names deleted."""
        numbered = sorted((int(m.group(1)), name) for name in self.listdir(rel)
                          if (m := pattern.fullmatch(name)) and (newest is None or int(m.group(1)) <= newest))
        old = [name for n, name in numbered[:max(0, len(numbered) - keep)] if below is None or n < below]
        for name in old:
            self.delete(_join(rel, name))
        return old

    def delete(self, rel: str) -> None:
        """Remove a file or a folder with everything below it; nothing if it does not exist."""
        if not self.remote:
            path = self.local_path(rel)
            if path.is_dir():
                import shutil
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return
        from pyarrow import fs
        filesystem, root = self._open()
        info = filesystem.get_file_info(_join(root, rel))
        if info.type == fs.FileType.Directory:
            filesystem.delete_dir(_join(root, rel))
        elif info.type == fs.FileType.File:
            filesystem.delete_file(_join(root, rel))

    def download(self, rel: str, local: str | os.PathLike) -> Path:
        """Copy a file, or a folder with everything below it, to `local`."""
        from pyarrow import fs
        local = Path(local)
        if not self.remote:
            src = self.local_path(rel)
            if src.is_dir():
                import shutil
                shutil.copytree(src, local, dirs_exist_ok=True)
            else:
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(src.read_bytes())
            return local
        filesystem, root = self._open()
        info = filesystem.get_file_info(_join(root, rel))
        if info.type == fs.FileType.Directory:
            local.mkdir(parents=True, exist_ok=True)
            fs.copy_files(_join(root, rel), str(local), source_filesystem=filesystem,
                          destination_filesystem=fs.LocalFileSystem(), use_threads=False)
        else:
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(self.read_bytes(rel))
        return local

    def mirror(self, local: str | os.PathLike | None = None) -> Path:
        """A local copy of the run folder to read: every file except what lies inside a trial's checkpoint
        folders (those folders are created empty, so their names can be listed). A local store is itself."""
        if not self.remote:
            return Path(self.where)
        from pyarrow import fs
        filesystem, root = self._open()
        local = Path(local or tempfile.mkdtemp(prefix="gatetune-run-"))
        try:
            entries = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
        except FileNotFoundError:
            entries = []
        for e in entries:
            rel = e.path[len(root):].lstrip("/")
            parts = rel.split("/")
            inside_checkpoint = any(layout.CHECKPOINT_DIR.fullmatch(p) for p in parts[:-1])
            if e.type == fs.FileType.Directory:
                (local / rel).mkdir(parents=True, exist_ok=True)
            elif e.type == fs.FileType.File and not inside_checkpoint:
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                with filesystem.open_input_stream(e.path) as f:
                    (local / rel).write_bytes(f.read())
        return local

    def check_writable(self) -> None:
        """UserError unless a file can be written into the run folder (before any work starts); folders this
        check had to create are removed again."""
        probe = ".gatetune_write_probe"
        created = None
        if not self.remote:
            created = next((p for p in reversed([Path(self.where), *Path(self.where).parents]) if not p.exists()), None)
        try:
            self.write_bytes(probe, b"")
            if not self.remote:
                self.local_path(probe).unlink()
            else:
                filesystem, root = self._open()
                filesystem.delete_file(_join(root, probe))
        except UserError:
            raise
        except Exception as e:   # noqa: BLE001  (OSError, pyarrow errors)
            raise UserError(f"cannot write here ({_oneline(e)}); give a folder (or bucket) this user can write to",
                            file=self.where) from None
        finally:
            if created is not None and created.exists():
                import shutil
                shutil.rmtree(created, ignore_errors=True)


def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if rel else root


def _oneline(e: BaseException) -> str:
    return first_line(e) or type(e).__name__
