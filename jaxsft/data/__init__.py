"""SFT data: verl-compatible tokenisation and loss masks, row validation, batching and packing.

See docs/DATA.md for the semantics, the deviations from verl and every error message.

Names are imported on first use: the tokenisation worker processes import `jaxsft.data.workers`
and must not pay for grain and JAX (the loader's imports) just to tokenise.
"""

import importlib

_EXPORTS = {
    "DataError": "errors", "DataWarning": "errors", "RunData": "run", "TokenizedDataset": "dataset",
    "TrainLoader": "loader", "build_dataset": "dataset", "build_datasets": "run", "segment_lengths": "loader",
    "summary": "dataset", "val_batches": "loader",
}

__all__ = ["DataError", "DataWarning", "RunData", "TokenizedDataset", "TrainLoader", "build_dataset", "build_datasets",
           "segment_lengths", "summary", "val_batches"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"jaxsft.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'jaxsft.data' has no attribute {name!r}")
