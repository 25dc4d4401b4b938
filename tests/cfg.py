"""Settings for tests: the keys a test cares about on top of verl's defaults, resolved as the
command line resolves them (placeholder paths for the two required keys)."""

from jaxsft import config

BASE = {"data.train_files": "/unused/train.parquet", "model.partial_pretrain": "/unused/model",
        "trainer.logger": ["console"], "trainer.device": "cpu"}


def settings(keys: dict | None = None, recipe: str | None = None):
    return config.settings_from({**BASE, **(keys or {})}, recipe=recipe)
