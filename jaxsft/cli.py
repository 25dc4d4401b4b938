"""The command line of `python -m jaxsft.train`: flags, settings, `--help`.

    python -m jaxsft.train [--config RECIPE] [--print_config] [--help] [KEY=VALUE ...]

RECIPE is a file (`configs/qwen7b.py`) or a bundled recipe's name (`qwen7b`). Settings are verl's
Hydra spelling (`data.train_batch_size=128`, `+data.ignore_input_ids_mismatch=true`,
`trainer.logger='["console","file"]'`, `key=null`, `${oc.env:HOME}`) or ml_collections'
(`--config.optim.lr=2e-5`). With no recipe, settings start from verl's `sft_trainer.yaml` defaults;
with no recipe and no settings at all, the smoke recipe runs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap

import yaml
from absl import logging as absl_logging

from jaxsft import distributed, xla_flags
from jaxsft.config import ConfigError, Settings, compose, resolve
from jaxsft.config.keys import KEYS
from jaxsft.errors import UserError
from jaxsft.plan.target import prepare_environment

SMOKE_RECIPE = "smoke"
FLAGS = ("--config", "--print_config", "--help", "--dry_run", "--dry_run_json")
_VALUED = ("--config", "--dry_run", "--dry_run_json")


@dataclasses.dataclass(frozen=True)
class Command:
    settings: Settings | None  # None with --help
    print_config: bool = False
    help: bool = False
    dry_run: str | None = None  # a plan target: cpu, gpu, h100:N, h200:N (jaxsft.plan)
    dry_run_json: str | None = None


def split_flags(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """({flag: value}, settings) from argv; a flag's value as `--flag=v` or `--flag v`."""
    flags: dict[str, str | bool] = {}
    settings: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--config."):
            if "=" not in arg and args and not args[0].startswith("-"):
                arg = f"{arg}={args.pop(0)}"  # `--config.KEY VALUE`, as absl flags allowed
            settings.append(arg)
            continue
        if not arg.startswith("-"):
            settings.append(arg)
            continue
        name, eq, value = arg.partition("=")
        if name in ("-h",):
            name = "--help"
        if name not in FLAGS:
            raise ConfigError(f"unknown flag {name!r}; the flags are {', '.join(FLAGS)}, and settings are KEY=VALUE")
        if name in _VALUED:
            if not eq:
                if not args or args[0].startswith("-"):
                    raise ConfigError(f"{name} needs a value ({name}=VALUE)")
                value = args.pop(0)
            flags[name] = value
        else:
            if eq:
                raise ConfigError(f"{name} takes no value")
            flags[name] = True
    return flags, settings


def parse(argv: list[str]) -> Command:
    """The command for `argv` (sys.argv[1:]), settings resolved; ConfigError on any mistake."""
    flags, overrides = split_flags(argv)
    if flags.get("--help"):
        return Command(None, help=True)
    if "--dry_run_json" in flags and "--dry_run" not in flags:
        raise ConfigError("--dry_run_json needs --dry_run=TARGET (cpu, gpu, h100:N or h200:N)")
    recipe = flags.get("--config")
    if recipe is None and not overrides:
        recipe = SMOKE_RECIPE
    settings = resolve(compose(overrides, recipe))
    return Command(settings, print_config=bool(flags.get("--print_config")), dry_run=flags.get("--dry_run"),
                   dry_run_json=flags.get("--dry_run_json"))


def help_text() -> str:
    """Every key with its default and one-line meaning, by section."""
    lines = [__doc__.strip(), "", "Flags: --config RECIPE, --print_config (print the resolved configuration and exit), "
             "--dry_run=TARGET (plan the train step for cpu, gpu, h100:N or h200:N and exit; --dry_run_json=PATH "
             "also writes it as JSON), --help.", "",
             "Settings (verl's keys unless marked [jaxsft]; [inert] = accepted, changes nothing here):"]
    section = None
    for key in KEYS:
        if key.recipe_only:
            continue
        top = key.name.split(".")[0] if "." in key.name else "(top level)"
        if top != section:
            lines.append(f"\n  {top}")
            section = top
        default = _show(key.default)
        marks = "".join((" [jaxsft]" if not key.verl else "", " [inert]" if key.inert else ""))
        choices = f" ({' | '.join(map(str, key.choices))})" if key.choices and len(key.choices) > 1 else ""
        lines.append(f"    {key.name} = {default}{marks}")
        lines.extend(textwrap.wrap(key.doc + choices + (f"; {key.inert}" if key.inert else ""), 96,
                                   initial_indent="        ", subsequent_indent="        "))
    return "\n".join(lines)


def keys_table() -> str:
    """The README's table of every key (kept equal to it by tests/test_config.py):
    `python -c "from jaxsft import cli; print(cli.keys_table())"`."""
    rows = ["| key | default | what it does in jaxsft |", "|---|---|---|"]
    for key in KEYS:
        if key.recipe_only:
            continue
        what = f"**inert** (said when set): {key.inert}" if key.inert else key.doc
        if key.choices and len(key.choices) > 1:
            what += f" — {' / '.join(map(str, key.choices))}"
        own = "" if key.verl else " *(jaxsft)*"
        rows.append(f"| `{key.name}`{own} | `{_show(key.default)}` | {what.replace('|', '/')} |")
    return "\n".join(rows)


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def run(argv: list[str], job, dry_run=None) -> int:
    """Parse `argv` and run `job(settings)`, or `dry_run(settings, target, json_path)` for
    `--dry_run`; --help and --print_config answer and return 0; a user's mistake (any `UserError`)
    prints one `jaxsft: error:` line and returns 2."""
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save at INFO
    try:
        command = parse(argv)
        if command.help:
            print(help_text())
        elif command.print_config:
            print(yaml.safe_dump(command.settings.config, sort_keys=False), end="")
        else:
            xla_flags.apply()  # before any JAX backend starts, as:
            prepare_environment(command.dry_run)
            if command.dry_run:
                if dry_run is None:
                    raise ConfigError("--dry_run is not available for this command")
                dry_run(command.settings, command.dry_run, command.dry_run_json)
            else:
                job(command.settings)
        return 0
    except UserError as e:
        print(f"jaxsft: error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as e:  # in training the first Ctrl-C saves and stops; this is the second
        print(f"jaxsft: {e or 'interrupted before training started: nothing saved'}", file=sys.stderr, flush=True)
        return 130
    except Exception as e:
        if distributed.is_multiprocess():
            distributed.abort(e)  # exits at once: jax's exit hook would wait for processes that may be gone
        raise


def exit(code: int) -> None:
    """End the process with `code`; a non-zero exit skips atexit, where jax's shutdown barrier would
    wait for the processes of a multi-process job that are gone."""
    sys.stdout.flush()
    if code:
        os._exit(code)

