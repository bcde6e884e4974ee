"""Atomic file writes: the one way seekling writes a file that must never be seen half-written.

Every writer goes to a temporary file in the target's own directory (so the rename cannot cross file
systems), is flushed and fsync'ed, and is then renamed over the target; the directory is fsync'ed too, so
the rename itself survives a power cut. A failure (or Ctrl-C) part-way removes the temporary file and
leaves the old target, if any, untouched. A failure because the disk is full is raised as `DiskFull`, whose
message is one line, "no space left on <path>" (torch's own writer says "unexpected pos 704 vs 598").

    write_text(path, "...")                 write_bytes(path, b"...")
    torch_save(path, obj)                   save_safetensors(path, tensors)
    with atomic_path(path) as tmp: <anything that writes the file `tmp`>
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems (and Windows) cannot open a directory: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DiskFull(OSError):
    """A write that failed for want of space, with where it was writing."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(errno.ENOSPC, f"no space left on {path}", str(path))

    def __str__(self) -> str:
        return self.strerror


FULL_WORDS = ("No space left", "StorageFull", "Disk quota exceeded")  # (in the text of writers that hide the errno)


def _is_disk_full(error: BaseException, path: Path, need_bytes: int) -> bool:
    """The error, or one it came from, says ENOSPC/EDQUOT; or (writers that hide the errno, such as torch's zip
    writer: "unexpected pos 704 vs 598") the file system of `path` has less room left than the write needed
    (its partial output is still there when this is asked), or less than 1 MiB."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT) \
                or any(w in str(seen) for w in FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        stat = os.statvfs(existing) if existing is not None else None
    except OSError:
        return False
    return stat is not None and stat.f_bavail * stat.f_frsize < max(2**20, need_bytes)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: about what saving it writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


@contextlib.contextmanager
def reporting_full_disk(path: str | os.PathLike, need_bytes: int = 0) -> Iterator[None]:
    """Raise a failure of the block that comes from a full disk as DiskFull(path); other errors pass as they are.
    `need_bytes`: about what the block writes (see _is_disk_full)."""
    try:
        yield
    except (DiskFull, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # (torch.distributed.checkpoint's CheckpointException is a BaseException)
        if _is_disk_full(e, Path(path), need_bytes):
            raise DiskFull(path) from e
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, need_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error, the file written there
    is fsync'ed and renamed onto `path`. On an error it is removed and `path` is left as it was (DiskFull when
    the disk is full; `need_bytes`: about what the block writes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        with reporting_full_disk(path, need_bytes):
            yield tmp
            with open(tmp, "rb+") as f:  # the writer may have closed its own handle: sync through a new one
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path, len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path, tensor_bytes(obj)) as tmp:
        torch.save(obj, tmp)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path, tensor_bytes(tensors)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata or {"format": "pt"})
