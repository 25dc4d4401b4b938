"""The model directory's tokenizer, refused in one line when it cannot be the real one.

transformers builds a tokenizer from whatever is there: with no `tokenizer.json` (and no
`vocab.json` + `merges.txt`) it returns one with an empty vocabulary that encodes every text to
nothing, and training on it runs. So the vocabulary files must be present (a remote-code
tokenizer, which names its own files, excepted) and the vocabulary must be at least the 256
tokens a byte-level vocabulary needs.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from jaxsft.errors import UserError
from jaxsft.hf.files import ModelDirError, check_readable, read_json

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


# ---- model.added_tokens -------------------------------------------------------------------------

ADDED_TOKENS_KEY = "model.added_tokens"


@dataclasses.dataclass(frozen=True)
class AddedTokens:
    """What `model.added_tokens` did to the tokenizer, and so to the model's vocabulary."""
    tokens: tuple[str, ...]  # as given, in order
    new_ids: tuple[int, ...]  # ids of the given tokens that were not in the vocabulary before
    base_vocab_size: int  # config.json's vocab_size
    vocab_size: int  # the model's vocabulary from now on: len(tokenizer), as resize_token_embeddings(len(tokenizer))

    def describe(self) -> str:
        known = len(self.tokens) - len(self.new_ids)
        already = f" ({known} already in the vocabulary)" if known else ""
        return (f"[jaxsft] {ADDED_TOKENS_KEY}: {len(self.new_ids)} new tokens{already}, ids {_ranges(self.new_ids)}; "
                f"vocabulary {self.base_vocab_size} → {self.vocab_size} rows (transformers' mean resizing)")


def _ranges(ids) -> str:
    if not ids:
        return "none"
    return f"{ids[0]}–{ids[-1]}" if list(ids) == list(range(ids[0], ids[-1] + 1)) else ", ".join(map(str, ids))


def read_added_tokens(value) -> tuple[str, ...]:
    """`model.added_tokens`: a list of tokens, or the path of a UTF-8 file with one token per line
    (line endings stripped, empty lines skipped). A token given twice is refused."""
    if isinstance(value, str):
        path = Path(value)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise UserError(f"{ADDED_TOKENS_KEY}={value!r}: no such file (give a file with one token per line, "
                            f"or a list of tokens)") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{ADDED_TOKENS_KEY}={value!r}: cannot read it as UTF-8 text "
                            f"({getattr(e, 'strerror', None) or e})") from None
        where = {}
        tokens = []
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            if line in where:
                raise UserError(f"{value}: line {number} repeats the token {line!r} of line {where[line]} "
                                f"({ADDED_TOKENS_KEY})")
            where[line] = number
            tokens.append(line)
        source = f"{value} holds"
    else:
        tokens = list(value)
        source = f"{ADDED_TOKENS_KEY} has"
        repeated = sorted({t for t in tokens if tokens.count(t) > 1})
        if repeated:
            raise UserError(f"{ADDED_TOKENS_KEY} gives {repeated[0]!r} more than once")
        if any(not t for t in tokens):
            raise UserError(f"{ADDED_TOKENS_KEY} has an empty token")
    if not tokens:
        raise UserError(f"{source} no token; set {ADDED_TOKENS_KEY}=null to add none")
    return tuple(tokens)


def add_tokens(tokenizer, tokens: tuple[str, ...], base_vocab_size: int) -> AddedTokens:
    """Add `tokens` to `tokenizer` (in place) as normal, non-special tokens (`tokenizer.add_tokens`,
    as HF Trainer scripts do): each is matched whole before the BPE runs, and decoding keeps it.
    Tokens already in the vocabulary keep their ids and are not counted as new."""
    before = len(tokenizer)
    tokenizer.add_tokens(list(tokens), special_tokens=False)
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    new_ids = tuple(sorted(i for i in ids if i >= before))
    vocab_size = len(tokenizer) if new_ids else base_vocab_size
    return AddedTokens(tuple(tokens), new_ids, base_vocab_size, vocab_size)
