"""Lossless file I/O shared by training, data generation and evaluation.

Two of the project's rules live here so that every caller gets them the same way:
- whole files (checkpoints, configs, reports) are written atomically: to a temporary
  name in the same folder, fsync'ed, then renamed over the target, so a crash leaves
  either the old file or the new one, never half of one;
- record streams (generated data, cached answers, metrics) are JSONL appended one record
  at a time and flushed + fsync'ed, so a kill loses at most the record in flight, and a
  torn last line left by a kill is cut away before the next append.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from minidpo.errors import MiniDPOError, ParameterError


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; on success it replaces `path` whole.

    On an exception the temporary folder is removed and `path` is untouched. A file (not a
    folder) at `path` is refused before anything is written.
    """
    path = Path(path)
    check_output_dir(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(f".{path.name}.old")
    _remove(old)  # left by a crash between the two renames below
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_output_dir(path: str | os.PathLike, param: str | None = None, *, replaces: str | None = None) -> None:
    """Refuse an output folder path that names an existing file; with `replaces` (a file name
    such as "config.json"), also a non-empty folder without that file, which replacing it whole
    would destroy (someone's other files, not an earlier output)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        _refuse(param, f"{path} is an existing file, not a folder; remove it or choose another path")
    if replaces is not None and path.is_dir() and not (path / replaces).exists() and any(path.iterdir()):
        _refuse(param, f"{path} is a folder of other files (no {replaces}) and would be replaced whole; "
                       "give a new or empty folder")


def _refuse(param: str | None, message: str):
    raise ParameterError(f"{param} {message}", param) if param else MiniDPOError(message)


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing or malformed file is a one-line MiniDPOError."""
    path = Path(path)
    with open_or_fail(path, binary=True) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise MiniDPOError(f"{path}:{line}: {_not_utf8(e)}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MiniDPOError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line of a JSONL file.

    A line that is not JSON raises MiniDPOError naming the file and line; to validate
    records and skip bad lines instead, use `read_jsonl_records`.
    """
    path = Path(path)
    for lineno, line, problem in _lines(path):
        if problem is None:
            try:
                yield lineno, json.loads(line)
                continue
            except json.JSONDecodeError as e:
                problem = f"invalid JSON ({e.msg})"
        raise MiniDPOError(f"{path}:{lineno}: {problem}")


def _lines(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """(line number, text, None) for each non-blank line of a UTF-8 file (a BOM allowed), or
    (line number, "", problem) for a line that is not UTF-8."""
    with open_or_fail(path, binary=True) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield lineno, "", _not_utf8(e)
                continue
            if line.strip():
                yield lineno, line, None


def _not_utf8(e: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{e.object[e.start]:02x} at column {e.start + 1}); save the file as UTF-8"


def read_jsonl_records(
    path: str | os.PathLike,
    required: dict[str, type | tuple[type, ...]],
    *,
    strict: bool = False,
    on_skip=None,
    nonempty: tuple[str, ...] = (),
) -> list[tuple[int, dict]]:
    """Read a JSONL file of objects, checking that each has the `required` keys and types.

    Returns (line number, record) pairs. The string keys in `nonempty` must hold more than
    whitespace. A bad line (also one that is not UTF-8) raises MiniDPOError (`strict=True`)
    or is skipped and passed to `on_skip(message)` (default: ignored); the caller reports
    the count of skipped lines.
    """
    path = Path(path)
    out: list[tuple[int, dict]] = []
    for lineno, line, problem in _lines(path):
        if problem is None:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"invalid JSON ({e.msg})"
            else:
                problem = _record_problem(obj, required, nonempty)
        if problem is None:
            out.append((lineno, obj))
            continue
        message = f"{path}:{lineno}: {problem}"
        if strict:
            raise MiniDPOError(message + " (fix or remove that line)")
        if on_skip is not None:
            on_skip(message)
    return out


def _record_problem(obj: Any, required: dict, nonempty: tuple[str, ...]) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    for key, typ in required.items():
        if key not in obj:
            return f'missing key "{key}"'
        if not isinstance(obj[key], typ):
            return f'key "{key}" has type {type(obj[key]).__name__}'
    for key in nonempty:
        if isinstance(obj.get(key), str) and not obj[key].strip():
            return f'key "{key}" is empty'
    return None


def open_or_fail(path: Path, *, binary: bool = False):
    try:
        return open(path, "rb") if binary else open(path, encoding="utf-8")
    except FileNotFoundError:
        raise MiniDPOError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise MiniDPOError(f"{path}: is a folder, expected a file") from None
    except OSError as e:
        raise MiniDPOError(f"{path}: cannot read ({e.strerror})") from None


class JsonlAppender:
    """Append JSON records to a file, each flushed and fsync'ed before `write` returns.

    Opening repairs a torn last line (a kill in the middle of a write) by truncating the
    file back to its last newline, so the file stays valid JSONL and a rerun can resume.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _truncate_torn_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        self._fsync = fsync

    def write(self, record: Any) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        if self._fsync:
            os.fsync(self._f.fileno())

    def write_many(self, records: Iterable[Any]) -> None:
        for r in records:
            self.write(r)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate_torn_tail(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Walk back to the last newline; everything after it is a partial record.
        pos, block = size, 4096
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                f.truncate(start + idx + 1)
                return
            pos = start
        f.truncate(0)


def load_jsonl_tolerant(path: str | os.PathLike) -> list[Any]:
    """All complete records of a JSONL file written by JsonlAppender (torn tail ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open_or_fail(path, binary=True) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MiniDPOError(f"{path}:{lineno}: {_not_utf8(e)}") from None
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return records
