"""The command line's settings: verl's Hydra spelling translated to ml_collections flags, unknown
keys refused with the nearest ones, free-form chat-template keyword arguments set aside."""

from __future__ import annotations

import re
import sys


def _fail(message: str) -> None:
    print(f"jaxsft: error: {message}", file=sys.stderr)
    sys.exit(2)


HYDRA_OVERRIDE = re.compile(r"^\+?([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)=(.*)$", re.S)


def _hydra_value(value: str) -> str:
    """Hydra reads `[model,optimizer]` as a list of strings; Python literals need the quotes."""
    import ast

    if value.startswith("[") and value.endswith("]"):
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            items = [v.strip().strip("'\"") for v in value[1:-1].split(",") if v.strip()]
            return "(" + "".join(f"{v!r}," for v in items) + ")"
    return value


def verl_style_overrides(args: list[str]) -> list[str]:
    """verl's Hydra overrides (`data.train_batch_size=128`, `+data.ignore_input_ids_mismatch=true`,
    `trainer.logger='["console","file"]'`) become `--config.KEY=VALUE`, so a verl launch line
    works as it is; any other bare argument is refused rather than silently ignored."""
    out = []
    for arg in args:
        match = None if arg.startswith("-") else HYDRA_OVERRIDE.match(arg)
        if match:
            out.append(f"--config.{match.group(1)}={_hydra_value(match.group(2))}")
        elif not arg.startswith("-") and out and out[-1] in ("--config", "--flagfile"):
            out.append(arg)  # the value of a flag given as two words
        elif arg.startswith("-"):
            out.append(arg)
        else:
            _fail(f"unexpected argument {arg!r}: give settings as KEY=VALUE (verl style) or --config.KEY=VALUE")
    return out


def check_override_keys(args: list[str]) -> None:
    """Every --config.KEY must be a key of the configuration: one line with the nearest keys
    instead of a traceback from flag parsing."""
    import difflib

    from jaxsft.config import default_config

    def keys(node, prefix=""):
        for k, v in node.items():
            yield prefix + k
            if hasattr(v, "items"):
                yield from keys(v, prefix + k + ".")

    known = set(keys(default_config()))
    for arg in args:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config."):].split("=", 1)[0]
            if key not in known and not key.startswith(TEMPLATE_KWARGS + "."):
                near = difflib.get_close_matches(key, sorted(known), n=3)
                _fail(f"unknown setting {key!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))


TEMPLATE_KWARGS = "data.apply_chat_template_kwargs"
template_kwargs: dict = {}  # free-form keys for the chat template, applied after the config is read


def take_template_kwargs(args: list[str]) -> list[str]:
    """`--config.data.apply_chat_template_kwargs.NAME=VALUE` adds a key verl's way; the locked
    config cannot, so these are set aside here and merged in `main`."""
    import ast

    rest = []
    for arg in args:
        prefix = f"--config.{TEMPLATE_KWARGS}."
        if arg.startswith(prefix) and "=" in arg:
            name, value = arg[len(prefix):].split("=", 1)
            try:
                template_kwargs[name] = ast.literal_eval({"true": "True", "false": "False"}.get(value, value))
            except (ValueError, SyntaxError):
                template_kwargs[name] = value
        else:
            rest.append(arg)
    return rest
