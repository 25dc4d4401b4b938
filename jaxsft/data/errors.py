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
    where = file if row is None else f"{file} row {row}"
    return f"{where}: " + _NEWLINES.sub(" ", str(problem).strip())
