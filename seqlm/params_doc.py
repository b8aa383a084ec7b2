"""docs/parameters.md, written from the schema in seqlm/params.py (`seqlm params-doc`).

The schema is the one source: each key's type, bounds and default come from its annotation, its
meaning from its `Field(description=...)`, a section's from its docstring. A test fails when the
committed page differs from what this writes (tests/test_params_doc.py).
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from seqlm.io import atomic_open
from seqlm.params import PARAMS_FILE, Params, load_params

DOC_FILE = Path("docs") / "parameters.md"

HEADER = """\
<!-- Written by `seqlm params-doc` from seqlm/params.py; edit the schema, not this page. -->
# Parameters (`params.yaml`)

Every knob of the pipeline is a key of `params.yaml`.
The schema in `seqlm/params.py` validates the file when a run starts.
An unknown key, a wrong type or a value out of bounds stops the run with one line naming the key
and the value (`tests/test_params.py`).
Types are strict: `"5"` is not an int.
Another file gives an experiment beside the DVC pipeline: `seqlm run --params FILE`.
Under DVC, `dvc exp run -S train_lm.epochs=50` changes one key.

A key with a default may be left out of the file.
"""


class UndocumentedField(ValueError):
    """A key of the schema has no description: the page would not say what it does."""


def render(params_file: Path | str = PARAMS_FILE) -> str:
    """The whole page. Keys without a default show their value in `params_file`."""
    shipped = load_params(params_file)
    parts = [HEADER]
    top = [(name, field) for name, field in Params.model_fields.items()
           if not _is_section(field)]
    parts.append(_table(top, prefix="", shipped=shipped))
    for name, field in Params.model_fields.items():
        if not _is_section(field):
            continue
        section: type[BaseModel] = field.annotation  # type: ignore[assignment]
        parts.append(f"## `{name}`\n\n{_section_text(section)}\n")
        parts.append(_table(list(section.model_fields.items()), prefix=f"{name}.",
                            shipped=getattr(shipped, name)))
    return "\n".join(parts)


def _is_section(field: FieldInfo) -> bool:
    return isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)


def _section_text(section: type[BaseModel]) -> str:
    doc = section.__doc__
    if not doc or doc == BaseModel.__doc__:
        raise UndocumentedField(f"seqlm/params.py: section {section.__name__} has no docstring")
    return " ".join(doc.split())


def _table(fields: list[tuple[str, FieldInfo]], prefix: str, shipped: BaseModel) -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in fields:
        if not field.description:
            raise UndocumentedField(
                f"seqlm/params.py: {prefix}{name} has no Field(description=...)")
        if field.is_required():
            default = f"required; params.yaml: {_value(getattr(shipped, name))}"
        else:
            default = _value(field.get_default(call_default_factory=True))
        kind = _type(field.annotation, field.metadata)
        rows.append(f"| `{prefix}{name}` | {kind} | {default} | {_cell(field.description)} |")
    return "\n".join(rows) + "\n"


def _value(value: object) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000)
    text = text.removesuffix("\n").removesuffix("\n...")
    return f"`{_cell(text)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _type(annotation: object, metadata: list[object]) -> str:
    """`int (> 0)`, `list of int (≥ 1, ≤ 12); at least 1 item`, `` `auto` \\| `cpu` `` ... from
    an annotation and the constraints pydantic keeps beside it."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        inner: list[object] = []
        for item in extra:
            inner.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        return _type(base, [*inner, *metadata])
    if origin in (Union, types.UnionType):
        return " or ".join(_type(arg, []) for arg in get_args(annotation))
    if origin is Literal:
        return " \\| ".join(f"`{arg}`" for arg in get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation)
        said = _bounds(metadata, noun="item")
        return f"list of {_type(item, [])}" + (f"; {', '.join(said)}" if said else "")
    if annotation is type(None):
        return "`null`"
    said = _bounds(metadata, noun="character")
    return getattr(annotation, "__name__", str(annotation)) + (f" ({', '.join(said)})" if said else "")


BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def _bounds(metadata: list[object], noun: str) -> list[str]:
    """The constraints pydantic keeps in a field's metadata (annotated_types' and its own)."""
    said: list[str] = []
    for item in metadata:
        said += [f"{symbol} {getattr(item, name)}" for name, symbol in BOUNDS
                 if getattr(item, name, None) is not None]
        if getattr(item, "min_length", None):
            said.append(f"at least {item.min_length} {noun}{'s' if item.min_length > 1 else ''}")
        if getattr(item, "pattern", None):
            said.append(f"matching `{_cell(item.pattern)}`")
        if getattr(item, "allow_inf_nan", None) is False:
            said.append("finite")
    return said


def write(path: Path = DOC_FILE) -> Path:
    text = render()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, encoding="utf-8") as out:
        out.write(text)
    return path
