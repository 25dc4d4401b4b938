"""The error types for mistakes in the user's input.

Raise `UserError` (or a subclass) where the cause is known, with one sentence that names the config
key, file or row and says what to do; `python -m jaxsft.train` prints it as one
`jaxsft: error: ...` line and exits 2. Anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in the user's settings, files or environment; the message is one sentence."""


class ConfigError(UserError):
    """A setting that cannot work; the message names the key."""
