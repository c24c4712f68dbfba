"""Render the configuration reference in docs/configuration.md from the ``Settings`` fields.

    python scripts/gen_config_docs.py            # rewrite the table in docs/configuration.md
    python scripts/gen_config_docs.py --check    # exit 1 when the committed file is out of date

The table (variable, type, default, limits, description) is built from ``app.settings.Settings``:
the field names, annotations, defaults, pydantic constraints and ``description=`` strings. It sits
between the two marker comments below; everything around them is hand-written and kept as it is.
A development tool, not part of the service: it lives outside ``app/`` and is not in the image.
``tests/test_docs.py`` fails when the committed file differs from what this renders.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from annotated_types import Ge, Gt, Le, Lt, MaxLen, MinLen
from pydantic import SecretStr
from pydantic.fields import FieldInfo

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/gen_config_docs.py` puts scripts/ on the path, not the repo
    sys.path.insert(0, str(REPO))

from app.settings import Settings  # noqa: E402

CONFIG_DOC = REPO / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN GENERATED: settings table (python scripts/gen_config_docs.py; do not edit by hand) -->"
END = "<!-- END GENERATED: settings table -->"

_TYPE_NAMES: dict[Any, str] = {
    str: "string", int: "integer", float: "number", bool: "boolean", Path: "path", SecretStr: "string (secret)",
}


def env_var(name: str, settings: type[Settings] = Settings) -> str:
    """The environment variable that sets field ``name`` (pydantic-settings: prefix + name, any case)."""
    return f"{settings.model_config.get('env_prefix', '')}{name}".upper()


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (annotation, False)."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(annotation)):
            return args[0], True
    return annotation, False


def type_text(field: FieldInfo) -> str:
    """A reader's name for the field's type; a ``Literal`` lists its values."""
    annotation, _ = _split_optional(field.annotation)
    if typing.get_origin(annotation) is Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    return _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def default_text(field: FieldInfo) -> str:
    """The default as one would write it in the environment; ``unset`` when it is ``None``."""
    default = field.get_default(call_default_factory=True)
    if default is None:
        return "unset"
    if isinstance(default, SecretStr):
        return "(secret)"
    if isinstance(default, Path):
        checkout = Path(sys.modules[Settings.__module__].__file__ or "").resolve().parents[1]
        if default.is_relative_to(checkout):  # the same table on every machine
            return f"`{default.relative_to(checkout).as_posix()}/` in the checkout"
    return f"`{_value(default)}`"


def limits_text(field: FieldInfo) -> str:
    """The field's pydantic constraints, e.g. ``≥ 1``, ``> 0``, ``≥ 1, ≤ 65535``."""
    parts = []
    for meta in field.metadata:
        if isinstance(meta, Ge):
            parts.append(f"≥ {_value(meta.ge)}")
        elif isinstance(meta, Gt):
            parts.append(f"> {_value(meta.gt)}")
        elif isinstance(meta, Le):
            parts.append(f"≤ {_value(meta.le)}")
        elif isinstance(meta, Lt):
            parts.append(f"< {_value(meta.lt)}")
        elif isinstance(meta, MinLen):
            parts.append("non-empty" if meta.min_length == 1 else f"length ≥ {meta.min_length}")
        elif isinstance(meta, MaxLen):
            parts.append(f"length ≤ {meta.max_length}")
    return ", ".join(parts) or "–"


def _cell(text: str) -> str:
    """Table-cell safe: one line, pipes escaped, ``<name>`` shown rather than read as an HTML tag."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render_table(settings: type[Settings] = Settings) -> str:
    """The Markdown table of every field, in the order ``Settings`` declares them."""
    lines = ["| variable | type | default | limits | description |", "|---|---|---|---|---|"]
    for name, field in settings.model_fields.items():
        if not field.description:
            raise ValueError(f"Settings.{name} has no description=; the configuration reference needs one")
        lines.append(f"| `{env_var(name, settings)}` | {type_text(field)} | {default_text(field)} | "
                     f"{limits_text(field)} | {_cell(field.description)} |")
    return "\n".join(lines)


def render(doc: str, settings: type[Settings] = Settings) -> str:
    """``doc`` with the text between the markers replaced by the current table."""
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise ValueError(f"{CONFIG_DOC.relative_to(REPO)} must hold the markers once each, in order:\n{BEGIN}\n{END}")
    head, rest = doc.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{render_table(settings)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when the file is out of date")
    args = parser.parse_args(argv)
    current = CONFIG_DOC.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{CONFIG_DOC.relative_to(REPO)} is out of date: run python scripts/gen_config_docs.py",
                  file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        CONFIG_DOC.write_text(wanted, encoding="utf-8")
        print(f"wrote {CONFIG_DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
