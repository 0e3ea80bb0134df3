"""The output folder of a build: what may be replaced, the lock, and what dead builds left.

A build writes ``.NAME.partial-PID`` beside ``--out NAME`` and renames it into place when it is
complete; ``.NAME.lock`` (an flock, with the holder's PID in it) keeps two builds apart, and a
replaced folder passes through ``.NAME.old-PID`` on its way out. A build killed outright
leaves these behind; they are recognised here as stale (no live process holds the lock, or
the PID in the name is gone), named by ``inspect`` and ``build``, and removed by the next build
of the same ``--out``.

``--force`` replaces only a folder that mllama-export wrote: a finished artifact folder whose
manifest.json we wrote and which holds nothing the manifest does not list (besides the reports
that validate and sensitivity write into it), or one of our own partial folders.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mllama_export.engines.manifest_read import FORMAT, INCOMPLETE_MARKER, MANIFEST
from mllama_export.errors import MllamaExportError

# Files our own commands add to a finished artifact folder after the build.
REPORT_FILES = {
    "drift/drift.json",
    "drift/drift.md",
    "drift/drift.png",
    "sensitivity/sensitivity.json",
    "sensitivity/sensitivity.md",
}
# TensorRT engines and their build scripts live under engines/ (exporter/engine_stage.py).
OWN_FOLDERS = ("engines/",)
INCOMPLETE_TEXT = "mllama-export build in progress\n"


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def partial_path(out: Path, pid: int | None = None) -> Path:
    return out.parent / f".{out.name}.partial-{os.getpid() if pid is None else pid}"


def is_ours(folder: Path) -> bool:
    return not foreign_files(folder)


def foreign_files(folder: Path) -> list[str]:
    """The files under ``folder`` that mllama-export did not write (all of them, when it is
    not one of our artifact or partial folders); [] for a folder that is ours."""
    if _is_partial(folder):
        return []
    manifest = _our_manifest(folder)
    if manifest is None:  # not ours at all: a few names say so (never walk a whole disk)
        return sorted(p.name for p in folder.iterdir())[:10]
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())
    listed = set(manifest["files"]) | {MANIFEST} | REPORT_FILES
    return [f for f in files if f not in listed and not f.startswith(OWN_FOLDERS)]


def _our_manifest(folder: Path) -> dict | None:
    """The manifest, when it is one mllama-export wrote: our format tag and writer version,
    and the files table that write_manifest adds last."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ours = (
        isinstance(manifest, dict)
        and str(manifest.get("format", "")).startswith(FORMAT.rpartition("/")[0] + "/")
        and isinstance((manifest.get("versions") or {}).get("mllama-export"), str)
        and isinstance(manifest.get("files"), dict)
    )
    return manifest if ours else None


def _is_partial(folder: Path) -> bool:
    marker = folder / INCOMPLETE_MARKER
    try:
        return marker.read_text() == INCOMPLETE_TEXT and not (folder / MANIFEST).exists()
    except OSError:
        return False


def check_replaceable(out: Path, force: bool) -> None:
    """Refuses, before any work, an --out that is a file or holds anything not ours."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise MllamaExportError(
            f"--out {out} is a file; expected a folder to write the artifacts into (a new one, "
            "or an artifact folder of an earlier build to replace with --force)"
        )
    if not out.exists() or not any(out.iterdir()):
        return
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (" and more" if len(foreign) > 3 else "")
        raise MllamaExportError(
            f"--out {out} holds files mllama-export did not write ({shown}); --force replaces "
            "only artifact folders written by `mllama-export build`. Choose another --out"
        )
    if not force:
        raise MllamaExportError(f"{out} already exists; pass --force to replace it")


# -- the lock and what dead builds leave --------------------------------------------------------


@contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """An exclusive flock beside the output folder, with our PID in it; the kernel drops it
    if the build dies, and the next build (or ``inspect``) sees that no one holds it.

    The lock file is removed on the way out. A build that opened it just before that removal
    finds its file unlinked once it holds the lock, and takes a fresh one.
    """
    path = lock_path(out)
    while True:
        lock = path.open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            lock.close()
            holder = _pid_in(path)
            raise MllamaExportError(
                f"another build into {out} is running (lock {path}"
                + (f", process {holder}" if holder else "")
                + "); wait for it to finish"
            ) from err
        if path.exists() and os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
            break
        lock.close()
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


def _pid_in(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def lock_is_held(path: Path) -> bool:
    """Whether a live process holds the flock; opening to test creates nothing."""
    try:
        with path.open("r") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class Leftover:
    path: Path
    kind: str  # "partial folder", "lock" or "replaced folder"
    pid: int | None  # the build process that left it

    def describe(self) -> str:
        who = f"build process {self.pid}, which is gone" if self.pid else "a build that is gone"
        return f"{self.path} ({self.kind} left by {who}{_size(self.path)})"


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:(?P<kind>partial|old)-(?P<pid>\d+)|lock)$")


def stale_leftovers(parent: Path, name: str | None = None, held: bool = False) -> list[Leftover]:
    """What dead builds left in ``parent`` (only of ``--out parent/name``, if given). A live
    build always holds its folder's lock, so whatever sits beside an unheld lock is stale;
    ``held``: the caller holds the lock of ``name`` itself (and its own files are not listed)."""
    if not parent.is_dir():
        return []
    found = []
    for path in sorted(parent.iterdir()):
        match = _LEFTOVER.match(path.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        ours = held and match["name"] == name
        if not ours and lock_is_held(lock_path(parent / match["name"])):
            continue  # a live build of that folder
        if match["kind"] is None:
            if not ours:
                found.append(Leftover(path, "lock", _pid_in(path)))
        elif int(match["pid"]) != os.getpid() or not ours:
            kind = "partial folder" if match["kind"] == "partial" else "replaced folder"
            if path.is_dir() and (kind == "replaced folder" or _is_partial(path)):
                found.append(Leftover(path, kind, int(match["pid"])))
    return found


def remove_leftovers(out: Path) -> list[Leftover]:
    """Removes what dead builds of ``out`` left (call with its lock held); returns them."""
    removed = stale_leftovers(out.parent, out.name, held=True)
    for left in removed:
        shutil.rmtree(left.path, ignore_errors=True)
    return removed


def replace(work: Path, out: Path) -> None:
    """Moves the finished ``work`` folder to ``out``, replacing our earlier one if any."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _size(path: Path) -> str:
    if not path.is_dir():
        return ""
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return f", {total / 1e9:.2f} GB" if total >= 1e7 else ""
