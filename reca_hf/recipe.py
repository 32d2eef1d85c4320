"""Reading a recipe: one YAML file of `RecAConfig` fields (plus an optional `env:` block) and `--field value`
overrides, parsed into a `RecAConfig` by trl's `TrlParser`, the same way for `reca train` and `reca validate`.

:func:`load_recipe` finds every problem before it gives up, each naming its recipe key (or flag): a YAML
syntax error (with its line and column), keys that are not fields, values of the wrong type (``max_steps:
fifty``, ``per_device_train_batch_size: [8]``), overrides that do not parse, and then every problem
`RecAConfig` itself finds. They come back together in one :class:`RecipeError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import importlib.util
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ._resources import resource_dir

LIST_FIELDS = ("freeze", "lora_target_modules")  # fields a list of space-separated flag values can set


class RecipeError(ValueError):
    """Every problem of a recipe and its overrides, each naming its key; ``problems`` lists them."""

    def __init__(self, problems: list[str], values: dict[str, Any] | None = None):
        self.problems = list(problems)
        self.values = dict(values or {})  # the raw values read (recipe, then overrides), for further checks
        super().__init__("\n".join(self.problems))


def recipe_path(recipe: str) -> Path:
    """A recipe path as given, or relative to the recipes shipped with reca_hf (e.g. 'janus/tiny_demo.yaml')."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = resource_dir("recipes") / recipe.removeprefix("recipes/")
    if shipped.is_file():
        return shipped
    raise SystemExit(f"reca: recipe {recipe!r} not found (also looked in {resource_dir('recipes')})")


def import_beside_recipe(recipe: Path, adapter: str | None) -> None:
    """Make a module next to the recipe importable when the recipe's ``adapter`` names a class in it
    (``adapter: my_umm:MyUMMAdapter`` beside ``my_umm.py``) and it is not importable already."""
    if not adapter or (":" not in adapter and "." not in adapter):
        return
    top = adapter.partition(":")[0].partition(".")[0]
    folder = recipe.resolve().parent
    if importlib.util.find_spec(top) is None and ((folder / f"{top}.py").is_file() or (folder / top).is_dir()):
        sys.path.insert(0, str(folder))


class _ListOrOne(argparse.Action):
    """One value is parsed as the field's string form (a mode, a regular expression, comma-separated
    patterns); several values are a list."""

    def __init__(self, *args, parse=str, **kwargs):
        self.parse = parse
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.parse(values[0]) if len(values) == 1 else list(values))


def recipe_parser():
    """trl's `TrlParser` for `RecAConfig`, where the union-typed fields take their parser from
    ``reca_hf.config.STRING_PARSERS`` (the parser alone would keep one member of the union). Its argparse
    errors raise :class:`RecipeError` instead of exiting."""
    from trl import TrlParser

    from .config import STRING_PARSERS, RecAConfig

    class RecAParser(TrlParser):
        @staticmethod
        def _parse_dataclass_field(parser, field):
            parse = STRING_PARSERS.get(field.name)
            if parse is None:
                return TrlParser._parse_dataclass_field(parser, field)
            names = [f"--{field.name}", f"--{field.name.replace('_', '-')}"]
            options = {"default": field.default, "help": field.metadata.get("help")}
            if field.name in LIST_FIELDS:  # `--freeze a b`: space-separated values make a list
                parser.add_argument(*names, nargs="+", action=_ListOrOne, parse=parse, **options)
            else:
                parser.add_argument(*names, type=parse, **options)

        def error(self, message: str):
            raise RecipeError([message])

    return RecAParser([RecAConfig], prog="reca train")


def load_recipe(recipe: str | Path | None, overrides: list[str] | None = None):
    """The `RecAConfig` of a recipe (or none: flags alone) with its command-line overrides, as `reca train` and
    `reca validate` both read it; sets the recipe's ``env:`` variables as trl does. Raises :class:`RecipeError`
    listing every problem found."""
    from .config import RecAConfig

    overrides = list(overrides or [])
    parser = recipe_parser()
    values: dict[str, Any] = {}
    if recipe is not None:
        path = recipe_path(str(recipe))
        values, problem = _read(path)
        if problem:
            raise RecipeError([problem])
        env = values.pop("env", None)
        if env is not None and not isinstance(env, dict):
            raise RecipeError([f"env={env!r}: not a mapping of environment variables to values"])
        for key, value in (env or {}).items():  # as TrlParser does
            os.environ[str(key)] = str(value)
    fields = {f.name for f in dataclasses.fields(RecAConfig) if f.init}
    problems = [
        f"{key}: unknown key, not a RecAConfig field{did_you_mean(key, fields) or ' (check the spelling)'}"
        for key in values
        if key not in fields
    ]
    known = {key: value for key, value in values.items() if key in fields}
    bad = value_problems(parser, known)
    flagged, flag_problems = _override_values(parser, overrides)
    problems += [*bad.values(), *flag_problems]
    raw = {**known, **flagged}
    if problems:  # also what RecAConfig finds in the values that parsed, so that every problem shows at once
        usable = {key: value for key, value in raw.items() if key not in bad and key not in _keys(flag_problems)}
        raise RecipeError(problems + _parsed(recipe_parser(), usable, [])[1], raw)
    config, problems = _parsed(parser, known, overrides)
    if problems:
        raise RecipeError(problems, raw)
    if recipe is not None:
        import_beside_recipe(path, config.adapter)
    return config


def did_you_mean(name: str, known) -> str:
    """``"; did you mean X?"`` for the closest known name (dashes and underscores alike), else ``""``."""
    canonical: dict[str, str] = {}
    for option in known:  # the first spelling of each name (a field's own, with underscores)
        canonical.setdefault(option.replace("-", "_"), option)
    close = difflib.get_close_matches(name.replace("-", "_"), list(canonical), n=1, cutoff=0.75)
    return f"; did you mean {canonical[close[0]]}?" if close else ""


def _keys(problems: list[str]) -> set[str]:
    return {re.split(r"[ :=]", problem, maxsplit=1)[0].removeprefix("--").replace("-", "_") for problem in problems}


def _parsed(parser, defaults: dict[str, Any], args: list[str]) -> tuple[Any, list[str]]:
    """``(config, [])``: ``args`` parsed over ``defaults`` into a `RecAConfig`; ``(None, problems)`` if it fails."""
    parser.set_defaults_with_config(**defaults)
    try:
        (config,) = parser.parse_args_into_dataclasses(args=args)
    except RecipeError as error:
        return None, error.problems
    except (ValueError, TypeError) as error:  # RecAConfig / TrainingArguments: every problem, one a line
        lines = str(error).splitlines()
        return None, [line.removeprefix("- ") for line in lines if line and line != "Invalid RecAConfig:"]
    return config, []


def _read(path: Path) -> tuple[dict[str, Any], str | None]:
    """The recipe's mapping, or the problem that stops reading it (a YAML syntax error, with line and column)."""
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark, context = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(error, "problem", None) or str(error)
        if getattr(error, "context", None):
            at = f" (line {context.line + 1}, column {context.column + 1})" if context is not None else ""
            what = f"{what}, {error.context}{at}"
        return {}, f"YAML syntax error{where}: {what}"
    if values is None:
        return {}, None
    if not isinstance(values, dict):
        return {}, f"a recipe must be a YAML mapping of RecAConfig fields, not {type(values).__name__}"
    return values, None


def value_problems(parser, values: dict[str, Any]) -> dict[str, str]:
    """``{key: problem}`` of the values that do not fit their field: a string the field's parser (the one argparse
    applies) refuses or that is not one of its choices, or a YAML value of another type than the field's
    annotation."""
    from .config import RecAConfig

    hints = _hints(RecAConfig)
    actions = {action.dest: action for action in parser._actions}
    problems = {}
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            continue
        if isinstance(value, str):
            problem = _string_problem(action, value)
        else:
            problem = None if _fits(value, hints.get(key, Any)) else f"not {_describe(hints.get(key, Any))}"
        if problem:
            problems[key] = f"{key}={value!r}: {problem}"
    return problems


def _override_values(parser, overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``{field: value}`` of ``--field value`` overrides, and every problem of them (unknown flags, missing or
    unparsable values), so that all are reported at once (argparse stops at the first)."""
    options = parser._option_string_actions
    values: dict[str, Any] = {}
    problems = []
    position = 0
    while position < len(overrides):
        token = overrides[position]
        position += 1
        flag, has_inline, inline = token.partition("=")
        if not token.startswith("--"):
            problems.append(f"{token!r}: not a --field value pair (a recipe is the first argument only)")
            continue
        action = options.get(flag)
        taken = []
        while position < len(overrides) and not overrides[position].startswith("--") and not has_inline:
            taken.append(overrides[position])
            position += 1
        if action is None:
            hint = did_you_mean(flag, [option for option in options if option.startswith("--")])
            problems.append(f"{flag}: unknown flag, not a RecAConfig field{hint or ' (reca train --help lists them)'}")
            continue
        given = [inline] if has_inline else taken
        if action.nargs == 0 and given:
            problems.append(f"{flag}: takes no value (got {' '.join(given)!r})")
            continue
        if action.nargs is None and len(given) != 1:
            problems.append(f"{flag}: needs one value (got {len(given)})")
            continue
        if action.nargs == "?" and len(given) > 1:
            problems.append(f"{flag}: takes at most one value (got {len(given)})")
            continue
        if action.nargs == "+" and not given:
            problems.append(f"{flag}: needs a value")
            continue
        for value in given:
            problem = _string_problem(action, value)
            if problem:
                problems.append(f"{flag} {value!r}: {problem}")
        if given:
            values[action.dest] = given[0] if len(given) == 1 else given
    return values, problems


def _string_problem(action: argparse.Action, value: str) -> str | None:
    """Why argparse would refuse ``value`` for ``action`` (its type function or its choices), else None."""
    parse = action.type
    converted: Any = value
    if callable(parse):
        try:
            converted = parse(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            return f"not {_type_name(parse)}"
    if action.choices is not None and converted not in action.choices:
        return f"not one of {', '.join(map(str, action.choices))}"
    return None


def _type_name(parse) -> str:
    names = {int: "an int", float: "a number", bool: "true or false"}
    if parse in names:
        return names[parse]
    if getattr(parse, "__name__", "") == "string_to_bool":
        return "true or false"
    if isinstance(parse, type) and issubclass(parse, enum.Enum):
        return f"one of {', '.join(str(member.value) for member in parse)}"
    return f"a valid value ({getattr(parse, '__name__', 'its parser')} refused it)"


def _hints(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be resolved here is left unchecked
        return {}


def _fits(value: Any, hint: Any) -> bool:
    """Whether a (non-string) YAML value fits a field annotation; unknown annotations accept anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, member) for member in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        member = args[0] if args else Any
        return isinstance(value, list | tuple) and all(_fits(item, member) for item in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in args
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint) or value in {member.value for member in hint}
    return True


def _describe(hint: Any) -> str:
    """A field annotation in words: 'an int', 'a number or null', 'a string or a list of strings'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        members = [_describe(member) for member in args]
        return " or ".join(dict.fromkeys(members))
    if hint is type(None):
        return "null"
    words = {bool: "true or false", int: "an int", float: "a number", str: "a string", dict: "a mapping"}
    if hint in words:
        return words[hint]
    if origin in (list, tuple) or hint in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is dict:
        return "a mapping"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return f"one of {', '.join(str(member.value) for member in hint)}"
    return f"a {getattr(hint, '__name__', hint)}"
