"""JSONL records: strict reading with file:line errors, and a crash-safe resumable writer.

Every stage of the pipeline reads one JSONL file and appends to another. The writer below is
what makes a stage resumable: each record is one `write` of one complete line on an O_APPEND
descriptor, a torn last line left by a kill -9 is cut off when the file is reopened, and the
ids already written are skipped on restart, so no record is ever duplicated or truncated.

Resuming is only safe with one writer per file: two runs on the same output would both see the same
ids as missing and both append them. So every writer first takes `OutputLock` on `<out>.lock`, an
flock the kernel drops when the holder exits, kill -9 included; a second live run stops at once
with an `OutputLockedError` naming the holder's pid, host and start time, written in the lock file.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from prm_jax.errors import InputError, RunError


class RecordError(InputError):
    """A bad input record; the message names the file, the line and what was expected."""


@dataclasses.dataclass(frozen=True)
class Line:
    path: str
    lineno: int
    record: dict[str, Any]

    def where(self) -> str:
        return f"{self.path}:{self.lineno}"

    def get(self, key: str, kind: type | tuple[type, ...] | None = None) -> Any:
        """The value at `key`, or a RecordError naming file:line and key."""
        if key not in self.record:
            raise RecordError(f"{self.where()}: missing key {key!r}")
        value = self.record[key]
        if kind is not None and not isinstance(value, kind):
            want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise RecordError(f"{self.where()}: key {key!r} should be {want}, got {type(value).__name__}")
        return value


def iter_items(path: str | os.PathLike) -> Iterator["Line | RecordError"]:
    """Every non-blank line of a JSONL file as a `Line`, or a RecordError (returned, not raised) for
    a line that is not a JSON object, so callers can choose to skip and count bad lines."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RecordError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1})")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                yield RecordError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object per line")
                continue
            if not isinstance(record, dict):
                yield RecordError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                continue
            yield Line(path, lineno, record)


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 file; bytes that are not UTF-8 raise a RecordError naming the line."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno, line_start = data.count(b"\n", 0, e.start) + 1, data.rfind(b"\n", 0, e.start) + 1
        raise RecordError(f"{path}:{lineno}: not UTF-8 text (byte {data[e.start]:#04x} "
                          f"at column {e.start - line_start + 1})") from None


def iter_lines(path: str | os.PathLike) -> Iterator[Line]:
    """Yield every non-blank line of a JSONL file as a `Line`; a bad line raises RecordError."""
    for item in iter_items(path):
        if isinstance(item, RecordError):
            raise item
        yield item


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [line.record for line in iter_lines(path)]


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write a whole file atomically (temp file + rename); returns the record count."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


def repair_tail(path: str) -> int:
    """Cut a torn last line (no trailing newline, left by a crash mid-write). Returns bytes cut."""
    if not os.path.exists(path):
        return 0
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline; everything after it is a partial record.
        pos, chunk = size, 1 << 16
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            pos = start
        else:
            keep = 0
        f.truncate(keep)
        return size - keep


class OutputLockedError(RunError):
    """Another live run is writing this output; the one-line message names the output and the holder."""


# flock errors that mean "this filesystem has no locks", not "someone holds it".
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HOLDER_WAIT_S = 1.0  # how long a refused run waits for a fresh holder to write its pid into the file


class OutputLock:
    """An exclusive lock on one output (a file, or a run directory) held through `lock_path`
    (default `<target>.lock`); taken when constructed, dropped by `release()` or at the end of `with`.

    An flock rather than a pid file: the kernel drops it when the holder exits however it exits,
    kill -9 included, so a lock left by a dead run is simply taken over. The file holds the holder's
    {"pid", "host", "since"} so a refused run can name it. flock conflicts between any two opens of
    the file, so two writers in one process exclude each other too, and on NFS it is a lock across
    hosts. Release deletes the file while still holding it; an acquirer that opened the deleted file
    sees that the path no longer names it and opens the new one.
    """

    def __init__(self, target: str | os.PathLike, lock_path: str | os.PathLike | None = None):
        self.target = os.fspath(target)
        self.lock_path = os.fspath(lock_path) if lock_path is not None else f"{self.target}.lock"
        self._fd = -1
        # flock excludes a second open in this process too, except on NFS, where it becomes a POSIX
        # lock (per process): so look at this process's own locks first.
        if any(lock.held and os.path.realpath(lock.lock_path) == os.path.realpath(self.lock_path)
               for lock in list(_HELD)):
            raise OutputLockedError(self._busy_message(_read_holder_file(self.lock_path)))
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputLockedError(self._busy_message(holder)) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in _NO_LOCKS:
                    raise
                warnings.warn(f"{self.lock_path}: this filesystem has no file locks ({e.strerror}); nothing stops "
                              f"a second run on {self.target} from duplicating its records", stacklevel=2)
                return
            if _names(self.lock_path, fd):
                break
            os.close(fd)  # the previous holder deleted the file we opened: lock the current one
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                         "since": time.strftime("%Y-%m-%d %H:%M:%S %z")})
        os.ftruncate(fd, 0)
        os.write(fd, (me + "\n").encode("utf-8"))
        self._fd = fd
        _HELD.add(self)

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def _busy_message(self, holder: dict[str, Any] | None) -> str:
        if holder is None:
            who = f"another process (it has not written itself into {self.lock_path} yet)"
        else:
            pid, host = holder["pid"], holder["host"]
            who = f"pid {pid} on host {host} since {holder.get('since', '?')}"
            if host == socket.gethostname() and pid == os.getpid():
                who += " (this process: an earlier writer on it is still open)"
            elif host == socket.gethostname() and not _alive(pid):
                who += " (that process has exited; a process it started still holds the lock)"
        return f"{self.target} is being written by {who}; wait for it or stop it (lock file {self.lock_path})"

    def release(self) -> None:
        if self._fd < 0:
            return
        try:
            if _names(self.lock_path, self._fd):
                os.unlink(self.lock_path)
        finally:
            os.close(self._fd)
            self._fd = -1
            _HELD.discard(self)

    def _forget(self) -> None:
        """In a forked child: close our copy of the descriptor (the parent keeps its lock)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        _HELD.discard(self)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.release()


# Locks held by this process. A forked child inherits each lock's open file description, and a
# child that outlived a killed parent would keep the output blocked: children close their copies.
_HELD: "weakref.WeakSet[OutputLock]" = weakref.WeakSet()
os.register_at_fork(after_in_child=lambda: [lock._forget() for lock in list(_HELD)])


def _names(path: str, fd: int) -> bool:
    """Whether `path` still names the file open on `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_holder_file(path: str) -> dict[str, Any] | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder named in a lock file, waiting briefly while it is empty or names a dead process
    of this host: a new holder may have taken the lock and not yet written itself in."""
    deadline = time.monotonic() + _HOLDER_WAIT_S
    holder = None
    while True:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            if isinstance(info, dict) and isinstance(info.get("pid"), int) and isinstance(info.get("host"), str):
                holder = info
                if info["host"] != socket.gethostname() or _alive(info["pid"]):
                    return holder
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
        if time.monotonic() >= deadline:
            return holder
        time.sleep(0.02)


class ResumableWriter:
    """Append records to a JSONL file, one complete line per write, skipping keys already there.
    Holds `OutputLock` on `<path>.lock` from construction to `close()`; a second writer on the same
    path raises OutputLockedError before it reads or repairs anything.

    >>> with ResumableWriter("out.jsonl") as out:
    ...     todo = [r for r in records if r["id"] not in out.done]
    ...     for r in todo: out.write(r)
    """

    def __init__(self, path: str | os.PathLike, key: str = "id", fsync_every: int = 1):
        self.path = os.fspath(path)
        self.key = key
        self.fsync_every = fsync_every
        self._fd = -1
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        # Locked before the tail repair: the torn "last line" of a live writer is a line in progress.
        self._lock = OutputLock(self.path)
        try:
            self.repaired_bytes = repair_tail(self.path)
            self.done: set[Any] = set()
            if os.path.exists(self.path):
                for line in iter_lines(self.path):
                    self.done.add(line.get(key))
            self.resumed = len(self.done)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except BaseException:
            self._lock.release()
            raise
        self._pending = 0

    def write(self, record: dict[str, Any]) -> bool:
        """Write one record; returns False (and writes nothing) if its key is already done."""
        k = record[self.key]
        if k in self.done:
            return False
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        written = os.write(self._fd, data)
        if written != len(data):  # a short write would tear the line: cut it and fail loudly
            os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_END) - written)
            raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes)")
        self.done.add(k)
        self._pending += 1
        if self._pending >= self.fsync_every:
            os.fsync(self._fd)
            self._pending = 0
        return True

    def close(self) -> None:
        if self._fd >= 0:
            try:
                if self._pending:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = -1
        if hasattr(self, "_lock"):
            self._lock.release()

    def __del__(self) -> None:  # a writer dropped unclosed (an exception between open and with) frees its lock
        self.close()

    def __enter__(self) -> "ResumableWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def process_shard(items: list, process_index: int, process_count: int) -> list:
    """The slice of `items` that host `process_index` of `process_count` handles (strided)."""
    return items[process_index::process_count]


def part_path(path: str, process_index: int, process_count: int) -> str:
    """Per-host output file in multi-host runs (`out.jsonl` -> `out.part-00001-of-00004.jsonl`)."""
    if process_count == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.part-{process_index:05d}-of-{process_count:05d}{ext or '.jsonl'}"
