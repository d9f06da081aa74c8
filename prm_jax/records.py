"""JSONL records: strict reading with file:line errors, and a crash-safe resumable writer.

Every stage of the pipeline reads one JSONL file and appends to another. The writer below is
what makes a stage resumable: each record is one `write` of one complete line on an O_APPEND
descriptor, a torn last line left by a kill -9 is cut off when the file is reopened, and the
ids already written are skipped on restart, so no record is ever duplicated or truncated.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any


class RecordError(ValueError):
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
    with open(path, encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
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


class ResumableWriter:
    """Append records to a JSONL file, one complete line per write, skipping keys already there.

    >>> with ResumableWriter("out.jsonl") as out:
    ...     todo = [r for r in records if r["id"] not in out.done]
    ...     for r in todo: out.write(r)
    """

    def __init__(self, path: str | os.PathLike, key: str = "id", fsync_every: int = 1):
        self.path = os.fspath(path)
        self.key = key
        self.fsync_every = fsync_every
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self.repaired_bytes = repair_tail(self.path)
        self.done: set[Any] = set()
        if os.path.exists(self.path):
            for line in iter_lines(self.path):
                self.done.add(line.get(key))
        self.resumed = len(self.done)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
            if self._pending:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1

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
