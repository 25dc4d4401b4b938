"""Configuration: the key table (`keys`), composing defaults + recipe + overrides (`compose`), and
resolving them into the typed settings of jaxsft.settings (`resolve`). See docs/CONTRACTS.md."""

from jaxsft.config.compose import Composed, compose
from jaxsft.config.errors import ConfigError
from jaxsft.config.keys import KEYS, default_config
from jaxsft.config.resolve import resolve
from jaxsft.settings import Settings, check_devices


def settings_from(overrides: list[str] | dict | None = None, recipe: str | None = None) -> Settings:
    """Settings for tests, tools and notebooks: `overrides` as command-line strings or {key: value}
    (applied as the command line would apply them)."""
    items = list(overrides.items()) if isinstance(overrides, dict) else list(overrides or ())
    return resolve(compose(items, recipe))


__all__ = ["Composed", "ConfigError", "KEYS", "Settings", "check_devices", "compose", "default_config", "resolve",
           "settings_from"]
