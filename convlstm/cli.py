"""Command-line flags generated from config dataclasses, so the CLI cannot drift from the code.

Each dataclass field becomes `--field-name` with its type taken from the annotation; a flag
that is not given leaves the value to the layer below (preset, then dataclass default), and an
explicit 0 or empty value is kept (no truthiness merges). User errors print one line, exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, NoReturn

from convlstm.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """Add one flag per field of dataclass `cls`, defaulting to None (= not given)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
            origin = typing.get_origin(annotation)
        if origin is Literal:
            kwargs["choices"] = typing.get_args(annotation)
            kwargs["type"] = type(kwargs["choices"][0])
        elif origin is tuple:
            kwargs["nargs"] = "*"
            kwargs["type"] = typing.get_args(annotation)[0]
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = annotation
        kwargs["help"] = (
            f"(default: {f.default!r})" if f.default is not dataclasses.MISSING else None
        )
        group.add_argument(flag, **kwargs)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` that were set on the command line."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(cls)
        if getattr(args, f.name, None) is not None
    }


def run_main(main: Callable[[], Any]) -> None:
    """Run an entry point; a UserError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
