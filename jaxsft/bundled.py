"""Paths of the data bundled with the package (tokenizer, HumanEval chats)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent / "assets"


def path(*parts: str) -> Path:
    return ROOT.joinpath(*parts)
