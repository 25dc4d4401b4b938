"""Settings for tests: the keys a test cares about on top of verl's defaults, resolved as the
command line resolves them (placeholder paths for the two required keys)."""

from jaxsft import config

BASE = {"data.train_files": "/unused/train.parquet", "model.partial_pretrain": "/unused/model",
        "trainer.logger": ["console"], "trainer.device": "cpu"}


def settings(keys: dict | None = None, recipe: str | None = None):
    return config.settings_from({**BASE, **(keys or {})}, recipe=recipe)


def chat_data(max_length: int = 512, **overrides):
    """The `data` settings of multi-turn chats (right truncation at `max_length`), `overrides` as data.KEY."""
    keys = {"data.multiturn.enable": True, "data.max_length": max_length, "data.truncation": "right"}
    return settings({**keys, **{f"data.{k}": v for k, v in overrides.items()}}).data
