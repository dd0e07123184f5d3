"""The README's configuration reference, generated from the section dataclasses and their field
docstrings, so that the documentation cannot drift from the code (a test compares them)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import typing

from tplus_dist.config.base import _type_name, to_dict
from tplus_dist.config.run import RunConfig

BEGIN = "<!-- config-reference:begin -->"
END = "<!-- config-reference:end -->"


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings: the string literal right after each annotated field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _fmt_default(v: object) -> str:
    v = to_dict(v)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return repr(v) if isinstance(v, str) else str(v)


def config_reference() -> str:
    lines = [BEGIN]
    defaults = RunConfig()
    for sec in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[sec.name]
        docs = field_docs(cls)
        summary = " ".join((cls.__doc__ or "").split())
        lines += ["", f"### `{sec.name}`", "", summary, "", "| field | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            typ = _type_name(hints[f.name]).replace("|", "\\|")
            default = _fmt_default(getattr(getattr(defaults, sec.name), f.name)).replace("|", "\\|")
            doc = docs.get(f.name, "").replace("|", "\\|")
            lines.append(f"| `{f.name}` | {typ} | `{default}` | {doc} |")
    lines.append(END)
    return "\n".join(lines)


def update_readme(path: str = "README.md") -> bool:
    """Rewrite the reference between the markers in ``path``; True if it changed."""
    from pathlib import Path

    p = Path(path)
    text = p.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    new = text[:start] + config_reference() + text[end:]
    p.write_text(new)
    return new != text


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"]:
        print("README.md updated" if update_readme() else "README.md already current")
    else:
        print(config_reference())
