"""The configuration's error type (defined with the others in jaxsft.errors, so that every layer can raise it)."""

from jaxsft.errors import ConfigError

__all__ = ["ConfigError"]
