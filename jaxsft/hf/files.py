"""A model directory's JSON files read with one-line errors (`ModelDirError` names the file)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxsft.errors import UserError


class ModelDirError(UserError):
    """A Hugging Face model directory that cannot be used; the message names the file."""


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def read_json(path: Path):
    """A JSON file of the model directory; any problem is one ModelDirError naming it. A key given
    twice is refused (json would keep the last one silently)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelDirError(f"{path} not found") from None
    except PermissionError:
        raise ModelDirError(f"cannot read {path}: permission denied") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelDirError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except _DuplicateKey as e:
        raise ModelDirError(f"{path} gives the key {e.args[0]!r} more than once") from None


def check_readable(model_dir: Path) -> None:
    """A directory we may not list or enter reads as empty to `is_file`: say what it is."""
    if model_dir.is_dir() and not os.access(model_dir, os.R_OK | os.X_OK):
        raise ModelDirError(f"cannot read {model_dir}: permission denied (the directory is not readable by this user)")
