"""Compose the configuration: defaults → recipe file → command-line overrides → one plain tree.

Overrides use verl's Hydra spelling (`KEY=VALUE`, `+KEY=VALUE`, `++KEY=VALUE`) or ml_collections'
(`--config.KEY=VALUE`). Values are parsed by OmegaConf, the library Hydra builds on: `null`,
`true`, numbers, `[a,b]` lists, `{k: v}` dicts and `${...}` interpolations (`${oc.env:HOME}`, other
keys) mean what they mean in a verl launch line. Each value is then checked against its key's kind
(`jaxsft.config.keys`), so a wrong type stops with one sentence naming the key.

The result remembers which keys the recipe or the command line set (`explicit`), because a few
verl keys and jaxsft keys spell the same setting and the resolution must know which one was asked for.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from jaxsft.config.errors import ConfigError
from jaxsft.config.keys import AFTER_EACH_EPOCH, AUTO, BY_NAME, DICT_KEYS, KEYS, Key, flatten, nested

RECIPES = Path(__file__).resolve().parent.parent.parent / "configs"


@dataclasses.dataclass(frozen=True)
class Composed:
    values: dict[str, Any]  # every key → its resolved value (interpolations done, kinds checked)
    explicit: frozenset[str]  # keys a recipe changed or the command line set
    from_command_line: frozenset[str]  # keys the command line set
    recipe: str | None  # the recipe file, if any


# ---- values --------------------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_value(key: Key, value: Any, where: str) -> Any:
    """`value` converted to `key`'s kind, or a ConfigError naming the key and where it came from."""

    def bad(expected: str):
        return ConfigError(f"{key.name}={value!r} ({where}) is not {expected}")

    if value is None:
        if key.optional:
            return None
        raise ConfigError(f"{key.name}=null ({where}) is not allowed: give a value (default {key.default!r})")
    kind = key.kind
    if kind == "int":
        if _is_int(value):
            out = value
        elif isinstance(value, float) and value.is_integer():
            out = int(value)
        else:
            raise bad("an integer")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a number")
        out = float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        out = value
    elif kind == "str":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad("a string")
        out = str(value)
    elif kind == "strs":
        items = [value] if isinstance(value, (str, Path)) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, (str, Path)) for i in items):
            raise bad("a string or a list of strings")
        out = tuple(str(i) for i in items)
    elif kind == "floats":
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(i, (int, float)) and not isinstance(i, bool) for i in value):
            raise bad("a list of numbers")
        out = tuple(float(i) for i in value)
    elif kind == "dict":
        if not isinstance(value, dict):
            raise bad("a mapping")
        out = dict(value)
    elif kind == "freq":
        if value == AFTER_EACH_EPOCH or _is_int(value):
            out = value
        else:
            raise bad(f"an integer or {AFTER_EACH_EPOCH}")
    elif kind == "int_or_auto":
        if value == AUTO or _is_int(value):
            out = value
        else:
            raise bad(f"an integer or {AUTO}")
    else:  # pragma: no cover - the key table uses only the kinds above
        raise AssertionError(kind)
    if key.choices is not None and out not in key.choices:
        raise ConfigError(f"{key.name}={out!r} ({where}) is not one of {', '.join(map(str, key.choices))}")
    return out


# ---- recipe files --------------------------------------------------------------------------------


def recipe_path(spec: str) -> tuple[Path, str | None]:
    """A recipe file from `--config SPEC`: a path (`configs/qwen7b.py`), or a bundled recipe's
    name (`qwen7b`), from any directory; `PATH:ARG` passes ARG to get_config (ml_collections)."""
    path, _, arg = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    for candidate in (Path(path), RECIPES / path, RECIPES / f"{path}.py"):
        if candidate.is_file():
            return candidate, arg or None
    names = sorted(p.stem for p in RECIPES.glob("*.py") if not p.name.startswith("_"))
    raise ConfigError(f"--config {spec!r}: no such recipe file; give a path or one of: {', '.join(names)}")


def load_recipe(spec: str) -> tuple[dict[str, Any], str]:
    """(flat {key: value} of the recipe's get_config(), its file)."""
    path, arg = recipe_path(spec)
    module_spec = importlib.util.spec_from_file_location(f"_jaxsft_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        cfg = module.get_config(arg) if arg is not None else module.get_config()
    except Exception as e:  # a recipe is the user's Python: say which file and what went wrong
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"--config {path}: the recipe failed to load ({type(e).__name__}: {msg})") from None
    tree = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return flatten(tree), str(path)


# ---- command-line overrides ----------------------------------------------------------------------


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` (Hydra: optional `+`/`++` prefix) or `--config.KEY=VALUE` → (KEY, value)."""
    body = text[len("--config."):] if text.startswith("--config.") else text.lstrip("+")
    if "=" not in body:
        raise ConfigError(f"unexpected argument {text!r}: give settings as KEY=VALUE (verl style) or --config.KEY=VALUE")
    name, raw = body.split("=", 1)
    if text.startswith("--config.") and raw == "None":  # ml_collections' spelling of null
        return name, None
    if text.startswith("--config.") and raw.startswith("(") and raw.endswith(")"):
        try:  # ml_collections' tuple spelling: --config.trainer.logger=("console","file")
            return name, list(ast.literal_eval(raw))
        except (ValueError, SyntaxError):
            pass
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]), resolve=False)["v"]
    except OmegaConfBaseException as e:
        raise ConfigError(f"{name}={raw!r}: cannot parse the value ({str(e).splitlines()[0]})") from None
    return name, "" if parsed is None and raw == "" else parsed


def _known(name: str) -> tuple[Key, str | None]:
    """The key an override names: a key of the table, or a sub-key of a dict-kind key."""
    if name in BY_NAME:
        return BY_NAME[name], None
    for dict_key in DICT_KEYS:
        if name.startswith(dict_key + "."):
            return BY_NAME[dict_key], name[len(dict_key) + 1:]
    near = difflib.get_close_matches(name, [k.name for k in KEYS], n=3)
    raise ConfigError(f"unknown setting {name!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))


# ---- composition ---------------------------------------------------------------------------------


def compose(overrides: list[str | tuple[str, Any]], recipe: str | None = None) -> Composed:
    """Defaults, then the recipe (a `--config` spec), then the overrides in order (command-line
    strings, or (key, value) pairs from code); interpolations resolved; every value checked."""
    values = {k.name: k.default for k in KEYS}
    explicit: set[str] = set()
    recipe_values, recipe_file = load_recipe(recipe) if recipe is not None else ({}, None)
    for name, value in recipe_values.items():
        if name not in BY_NAME:
            near = difflib.get_close_matches(name, [k.name for k in KEYS], n=3)
            raise ConfigError(f"recipe {recipe_file or ''}: unknown setting {name!r}"
                              + (f"; did you mean {', '.join(near)}?" if near else ""))
        if _normal(value) != _normal(values[name]):
            values[name] = value
            explicit.add(name)
    command_line: set[str] = set()
    for item in overrides:
        name, value = parse_override(item) if isinstance(item, str) else item
        key, sub = _known(name)
        if key.recipe_only:
            raise ConfigError(f"{key.name} is set by the smoke recipe only; give model.partial_pretrain a model directory")
        if sub is None:
            values[key.name] = value
        else:
            values[key.name] = {**(values[key.name] or {}), sub: value}
        explicit.add(key.name)
        command_line.add(key.name)
    resolved = _interpolate(values)
    where = {name: "command line" if name in command_line else "recipe" if name in explicit else "default"
             for name in values}
    checked = {name: check_value(BY_NAME[name], resolved[name], where[name]) for name in values}
    return Composed(checked, frozenset(explicit), frozenset(command_line), recipe_file)


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


def _interpolate(values: dict[str, Any]) -> dict[str, Any]:
    """Resolve `${...}` (other keys, `oc.env`, ...) over the whole tree, as Hydra does."""
    tree = OmegaConf.create(nested({k: _normal(v) for k, v in values.items()}))
    try:
        plain = OmegaConf.to_container(tree, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "a setting"
        why = str(e).splitlines()[0].replace("KeyError raised while resolving interpolation: ", "").strip('"')
        raise ConfigError(f"{key}={values.get(key, '?')!r}: cannot resolve the interpolation ({why})") from None
    flat = flatten(plain)
    return {name: flat.get(name) for name in values}
