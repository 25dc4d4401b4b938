"""SFT data: verl-compatible tokenisation and loss masks, row validation, batching and packing.

See docs/DATA.md for the semantics, the deviations from verl and every error message.
"""

from jaxsft.data.dataset import TokenizedDataset, build_dataset, summary
from jaxsft.data.errors import DataError, DataWarning
from jaxsft.data.loader import TrainLoader, segment_lengths, val_batches
from jaxsft.data.run import RunData, build_datasets
from jaxsft.hf.tokenizer import load_tokenizer  # re-export: it lives at the HF boundary now

__all__ = ["DataError", "DataWarning", "RunData", "TokenizedDataset", "TrainLoader", "build_dataset", "build_datasets", "load_tokenizer",
           "segment_lengths", "summary", "val_batches"]
