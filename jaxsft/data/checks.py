"""Checks on a whole tokenised data set: what the model can embed and whether anything trains."""

from __future__ import annotations

import warnings

import numpy as np

from jaxsft.data.errors import DataError, DataWarning, at

# A training set where at least this share of rows has zero loss tokens gets a warning: such a row
# costs a full forward and backward pass and trains nothing, so at 10 % a tenth of the compute is
# spent for nothing and each step holds a tenth fewer useful samples than data.train_batch_size
# says. Below it, a few long-prompt outliers cut by truncation are normal and not worth a warning.
ZERO_LOSS_WARN_SHARE = 0.10


def check_vocab(dataset, tokenizer, vocab_size: int | None) -> None:
    """Every kept token id (and the pad id) must index the model's embedding table: an id past it
    reads NaN (JAX fills out-of-range gathers), the loss is NaN and every update is skipped."""
    if vocab_size is None:
        return
    pad = tokenizer.pad_token_id
    if pad is not None and pad >= vocab_size:
        raise DataError(f"the tokenizer's pad token {tokenizer.pad_token!r} has id {pad}, outside the model's "
                        f"vocabulary (vocab_size={vocab_size}): use the model's own tokenizer, or resize the "
                        f"model's embeddings first")
    ids = dataset.input_ids
    if dataset.max_id() < vocab_size:
        return
    outside = np.flatnonzero(ids >= vocab_size)
    sample = int(np.searchsorted(dataset.offsets, outside[0], side="right")) - 1
    bad = int(ids[outside[0]])
    file, row = dataset.origins[sample]
    rows = len(np.unique(np.searchsorted(dataset.offsets, outside, side="right")))
    raise DataError(at(file, row, f"token id {bad} ({tokenizer.convert_ids_to_tokens(bad)!r}) is outside the model's "
                                  f"vocabulary (vocab_size={vocab_size}; the tokenizer has {len(tokenizer)} tokens, "
                                  f"{rows} row(s) use ids beyond the model's): use the model's own tokenizer, or "
                                  f"resize the model's embeddings for the added tokens first"))


def check_loss_tokens(dataset, *, split: str, raw_loss_tokens: np.ndarray, truncated: np.ndarray) -> None:
    """Training data with no loss token at all is an error; a large share of rows without any is
    a warning. Validation is only counted (stats `loss_tokens`, `zero_loss_rows`): the trainer
    says there that nothing is scored."""
    s = dataset.stats
    zero = dataset.loss_tokens == 0
    s["loss_tokens"], s["zero_loss_rows"] = int(dataset.loss_tokens.sum()), int(zero.sum())
    if split != "train" or not zero.any():
        return
    n, files = len(zero), ", ".join(dataset.inputs())
    cut = int((zero & truncated & (raw_loss_tokens > 0)).sum())
    empty = int((zero & (raw_loss_tokens == 0)).sum())
    why = "; ".join(part for k, part in (
        (cut, f"{cut} cut to data.max_length={s['max_length']} by data.truncation={s['truncation']}"),
        (empty, f"{empty} without an assistant token even before truncation: no assistant turn, or nothing after "
                f"the generation prompt")) if k)
    if s["loss_tokens"] == 0:
        hint = ("; truncation=right keeps each row's first tokens, so the responses were cut off: raise data.max_length "
                "or use data.truncation=left" if cut and s["truncation"] == "right" else
                "; raise data.max_length" if cut else "; check data.messages_key and the message roles")
        raise DataError(f"{files}: the training data has no loss tokens, none of its {n} row(s) keeps an assistant "
                        f"token to train on ({why}){hint}")
    share = s["zero_loss_rows"] / n
    if share >= ZERO_LOSS_WARN_SHARE:
        warnings.warn(f"{files}: {s['zero_loss_rows']} of {n} training rows ({share:.1%}) have zero loss tokens and "
                      f"train nothing ({why}); they cost compute and shrink the effective batch", DataWarning,
                      stacklevel=3)
