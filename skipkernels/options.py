"""Config dataclass fields that carry their command-line flag.

A field declared with ``option(default, help, ...)`` holds its help text (and its choices, taken
from the constant the dataclass validates against) in ``dataclasses.field(metadata=...)``.
``add_options`` turns the fields of a dataclass into argparse arguments and ``from_args`` builds
the dataclass back from the parsed arguments:

- the flag is the field name with dashes (``skip_layers`` -> ``--skip-layers``), its default the
  dataclass default, its type the field's annotation;
- a bool field is one flag that flips its default: ``--deterministic`` (default False) or
  ``--no-progress`` (default True);
- a None among the choices is written ``none`` on the command line (``--amp none``);
- ``flag=`` names the flag otherwise; with ``const=`` it takes no value and stores that one
  (``--mixed-batches`` stores ``same_class_batches=False``);
- ``cli=False`` keeps a field off the command line (a field without option() gets a flag too);
- ``identity=False`` marks a field that changes neither the trained weights nor the reported
  result (workers, progress bars, batch sizes of caching and evaluation): a run's folder may be
  resumed with another value. Every other field is part of the run's identity
  (``identity_fields``), so a new field is by default.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import typing

_KEY = "skipkernels.option"
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_UNSET = object()


@dataclasses.dataclass(frozen=True)
class Option:
    help: str | None = None
    choices: tuple | None = None
    flag: str | None = None    # the flag, when it is not the field name's
    const: object = _UNSET     # the value a flag without an argument stores
    cli: bool = True           # False: no flag; the field keeps its default (or the caller sets it)
    identity: bool = True      # False: changes neither the trained weights nor the reported result


def option(default, help: str | None = None, *, choices=None, flag: str | None = None, const=_UNSET,
           cli: bool = True, identity: bool = True):
    """A dataclass field with default ``default`` and its command-line flag."""
    meta = Option(help, tuple(choices) if choices is not None else None, flag, const, cli, identity)
    return dataclasses.field(default=default, metadata={_KEY: meta})


def spec(field: dataclasses.Field) -> Option:
    return field.metadata.get(_KEY, Option())


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that have a flag."""
    return [f for f in dataclasses.fields(cls) if spec(f).cli]


def identity_fields(cls) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` that are part of a run's identity (all but identity=False)."""
    return [f for f in dataclasses.fields(cls) if spec(f).identity]


def identity_values(config) -> dict:
    """``{field: value}`` of the identity fields of dataclass instance ``config``, as a run's
    identity records them. A class with two spellings of one setting writes them one way in its
    ``canonical_identity(values)`` (``SkipConfig``'s top_count and top_ratio)."""
    values = {f.name: getattr(config, f.name) for f in identity_fields(type(config))}
    canonical = getattr(type(config), "canonical_identity", None)
    return canonical(values) if canonical is not None else values


def outside_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from the function that calls this, of the first frame outside
    skipkernels and dataclasses: a config's warning names the user's line, and is shown once for
    it however often the package rebuilds that config (``dataclasses.replace``)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    inside = (dataclasses.__file__, "<string>")  # "<string>": a dataclass's generated __init__
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (frame.f_code.co_filename.startswith(package)
                                        or frame.f_code.co_filename in inside):
        frame, level = frame.f_back, level + 1
    return level


def flag_of(field: dataclasses.Field) -> str:
    s = spec(field)
    if s.flag is not None:
        return s.flag
    name = "--" + field.name.replace("_", "-")
    if _field_type(field) is bool:
        return "--no-" + name[2:] if field.default else name
    return name


def _field_type(field: dataclasses.Field):
    # "int", "str | None" under `from __future__ import annotations`; else int, str | None
    kinds = [k.strip() for k in field.type.split("|")] if isinstance(field.type, str) \
        else list(typing.get_args(field.type)) or [field.type]
    kinds = [_TYPES.get(k, k) for k in kinds if k not in ("None", type(None))]
    kind = kinds[0] if len(kinds) == 1 else None
    if kind not in _TYPES.values():
        raise TypeError(f"field {field.name!r}: no command-line type for annotation {field.type!r}")
    return kind


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, as ``(default: ...)`` after its help: every option
    that takes a value and has a default (a None among its choices shows as ``none``), unless its
    help already says what the default is. Flags without a value (``--no-progress``) have none."""

    def _format_action(self, action):
        if not (action.help or "").strip() and action.nargs != 0 and action.option_strings and \
                action.default not in (None, [], argparse.SUPPRESS):
            action = copy.copy(action)  # an option without help still shows its default
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        help, default = action.help or "", action.default
        if action.nargs == 0 or "%(default)" in help or "(default:" in help or default is argparse.SUPPRESS:
            return action.help
        if default is None and "none" in (action.choices or ()):
            return f"{help} (default: none)"
        if default is None or default == []:
            return action.help
        return f"{help} (default: %(default)s)"


def add_options(parser: argparse.ArgumentParser, cls, exclude=()) -> None:
    """One argument per flagged field of dataclass ``cls`` (dest: the field name), but the fields
    named in ``exclude`` (a command that sets them its own way)."""
    for field in cli_fields(cls):
        if field.name in exclude:
            continue
        s = spec(field)
        kwargs = {"dest": field.name, "default": field.default}
        help = (s.help or "").replace("%", "%%")  # argparse formats help with %
        if s.const is not _UNSET:
            kwargs.update(action="store_const", const=s.const)
        elif _field_type(field) is bool:
            kwargs["action"] = "store_false" if field.default else "store_true"
            help = f"disable {help}" if field.default and help else help
        else:
            kwargs["type"] = _field_type(field)
            if s.choices is not None:
                kwargs["choices"] = ["none" if c is None else c for c in s.choices]
        parser.add_argument(flag_of(field), help=help or None, **kwargs)


def from_args(cls, args: argparse.Namespace, exclude=(), **overrides):
    """Dataclass ``cls`` from the parsed ``args`` of ``add_options``; ``overrides`` win. Fields in
    ``exclude`` (as given to ``add_options``) keep their default unless overridden."""
    values = {}
    for field in cli_fields(cls):
        if field.name in exclude:
            continue
        value = getattr(args, field.name)
        if value == "none" and None in (spec(field).choices or ()):
            value = None
        values[field.name] = value
    return cls(**{**values, **overrides})
