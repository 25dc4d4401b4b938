"""The data layer's exception and warning classes and its one-line message format."""

from __future__ import annotations

import re

from jaxsft.errors import UserError

_NEWLINES = re.compile(r"\s*\n\s*")


class DataError(UserError):
    """Bad input data or a batching setting that cannot work; one line naming file, row and problem."""


class DataWarning(UserWarning):
    """Data that loads but trains nothing (or less than it seems to)."""


def at(file: str, row: int | None, problem: str) -> str:
    """`file row N: problem` on one line (exception texts from templates can span lines)."""
    return f"{where(file, row)}: " + _NEWLINES.sub(" ", str(problem).strip())


def where(file: str, row: int | None) -> str:
    """`file row N` (0-based), or `file line N` for a row of a JSON-lines file: the line an editor shows."""
    if row is None:
        return file
    lines = _lines(file)
    return f"{file} line {lines[row]}" if lines is not None and 0 <= row < len(lines) else f"{file} row {row}"


def numbered(file: str, rows: list[int]) -> str:
    """`rows 3, 5` (or `lines 4, 7` of a JSON-lines file), with `, ...` after the first 20."""
    lines = _lines(file)
    named = [lines[r] if lines is not None and 0 <= r < len(lines) else r for r in rows[:20]]
    return f"{'lines' if lines is not None else 'rows'} {', '.join(map(str, named))}{', ...' if len(rows) > 20 else ''}"


def _lines(file: str) -> list[int] | None:
    """The line number of each row of a JSON-lines file (pyarrow.json skips blank lines); None for
    any other file. Read only when a message names a row of one."""
    if not str(file).endswith((".jsonl", ".json")):
        return None
    lines, first = [], None
    try:
        with open(file, "rb") as f:
            for n, line in enumerate(f, 1):
                text = line.removeprefix(b"\xef\xbb\xbf").strip() if n == 1 else line.strip()
                if text:
                    first = first or text[:1]
                    lines.append(n)
    except OSError:
        return None
    return None if first == b"[" else lines  # a JSON array: its rows are its items, named by index
