"""The configuration's error type."""

from jaxsft.errors import UserError


class ConfigError(UserError):
    """A setting that cannot work; the message names the key."""
