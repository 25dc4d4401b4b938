"""The model directory's tokenizer, refused in one line when it cannot be the real one.

transformers builds a tokenizer from whatever is there: with no `tokenizer.json` (and no
`vocab.json` + `merges.txt`) it returns one with an empty vocabulary that encodes every text to
nothing, and training on it runs. So the vocabulary files must be present (a remote-code
tokenizer, which names its own files, excepted) and the vocabulary must be at least the 256
tokens a byte-level vocabulary needs.
"""

from __future__ import annotations

import os
from pathlib import Path

from jaxsft.hf.load import ModelDirError, check_readable, read_json

# Any one of these holds a vocabulary transformers can read.
VOCABULARY_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
MIN_VOCABULARY = 256  # one token per byte: no byte-level vocabulary is smaller


def _remote_code(model_dir: Path, names: set[str]) -> bool:
    if "tokenizer_config.json" not in names:
        return False
    cfg = read_json(model_dir / "tokenizer_config.json")
    return isinstance(cfg, dict) and "AutoTokenizer" in (cfg.get("auto_map") or {})


def open_tokenizer(model_dir, *, trust_remote_code: bool = False):
    """`AutoTokenizer.from_pretrained(model_dir)` as the directory holds it (for export), after
    checking its vocabulary files are there; problems are one ModelDirError naming the directory."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    check_readable(model_dir)
    names = set(os.listdir(model_dir)) if model_dir.is_dir() else set()
    if not any(set(group) <= names for group in VOCABULARY_FILES) and not (
            trust_remote_code and _remote_code(model_dir, names)):
        if not names & set(TOKENIZER_FILES):
            raise ModelDirError(f"{model_dir} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt): "
                                f"copy them from the model these weights were trained from")
        raise ModelDirError(f"{model_dir / 'tokenizer.json'} is missing (and there is no vocab.json + merges.txt): "
                            f"transformers would build an empty vocabulary from the other tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the user's files: corrupt JSON, remote code not trusted, ...
        cause = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelDirError(f"transformers cannot load the tokenizer in {model_dir}: {type(e).__name__}: {cause}") from None
    if len(tokenizer) < MIN_VOCABULARY:
        raise ModelDirError(f"the tokenizer in {model_dir} has only {len(tokenizer)} tokens (a byte-level vocabulary "
                            f"has at least {MIN_VOCABULARY}): its vocabulary file is empty or not the real one")
    return tokenizer


def load_tokenizer(model_dir, trust_remote_code: bool = False):
    """The tokenizer to train with: the directory's, checked; a missing pad token falls back to eos
    (as verl does)."""
    tokenizer = open_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
