"""Write docs/configuration.md from jaxalign/config.py: every key, its type, default and comment.

Sections whose dataclass lives beside its component (e.g. `RLConfig` in
jaxalign/trainers/rl_config.py) are read from the module config.py imports them from.

    python scripts/make_config_docs.py [--check]

The reference is generated so it cannot drift from the code; `--check` (run by the tests) exits
non-zero when the committed file is stale.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "jaxalign" / "config.py"
TARGET = REPO / "docs" / "configuration.md"

HEADER = """# Configuration reference

Generated from `jaxalign/config.py` by `scripts/make_config_docs.py`; do not edit by hand.

A config is a YAML file of these sections; any key can be overridden on the command line with
`--set section.key=value` (values are read as YAML: `true`, `3`, `1e-4`, `[64, 128]`, `null`).
Unknown keys and wrong types are errors before anything compiles.
"""


def _comments(lines: list[str], node: ast.AnnAssign) -> str:
    """The trailing comment of a field, or the comment lines just above it."""
    line = lines[node.lineno - 1]
    if "#" in line and not line.strip().startswith("#"):
        return line.split("#", 1)[1].strip()
    above = []
    i = node.lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        above.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    return " ".join(above)


def _default(node: ast.AnnAssign) -> str:
    if node.value is None:
        return "(required)"
    if isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "field":
        for kw in node.value.keywords:
            if kw.arg == "default_factory":
                inner = kw.value
                if isinstance(inner, ast.Lambda):
                    return f"`{ast.unparse(inner.body)}`"
                return (
                    "(section)"
                    if isinstance(inner, ast.Name) and inner.id[0].isupper()
                    else f"`{ast.unparse(inner)}()`"
                )
    return f"`{ast.unparse(node.value)}`"


def _cell(text: str) -> str:
    """Escape pipes so a table cell stays one cell."""
    return text.replace("|", "\\|")


def _classes(path: Path) -> dict[str, tuple[ast.ClassDef, list[str]]]:
    """name -> (class node, its file's lines) of the classes defined in `path` and in the
    jaxalign modules it imports names from."""
    source = path.read_text()
    tree = ast.parse(source)
    classes = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxalign."):
            module = REPO / Path(*node.module.split(".")).with_suffix(".py")
            if module.is_file():
                classes.update(_classes(module))
    lines = source.splitlines()
    classes.update({n.name: (n, lines) for n in tree.body if isinstance(n, ast.ClassDef)})
    return classes


def render() -> str:
    classes = _classes(SOURCE)
    top, lines = classes["Config"]
    out = [HEADER]
    sections = []
    out.append("## Top level\n")
    out.append("| key | type | default | meaning |\n|---|---|---|---|")
    for node in top.body:
        if not isinstance(node, ast.AnnAssign):
            continue
        name, typ = node.target.id, ast.unparse(node.annotation)
        if typ in classes:
            sections.append((name, classes[typ]))
            continue
        out.append(
            f"| `{name}` | `{_cell(typ)}` | {_cell(_default(node))} | "
            f"{_cell(_comments(lines, node))} |"
        )
    for name, (cls, lines) in sections:
        doc = ast.get_docstring(cls) or ""
        out.append(f"\n## `{name}`\n\n{doc}\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        for node in cls.body:
            if isinstance(node, ast.AnnAssign):
                key = node.target.id
                optional = ast.unparse(node.annotation).removesuffix(" | None")
                if optional in classes:  # an optional sub-section (model.lora): its own table
                    sections.append((f"{name}.{key}", classes[optional]))
                out.append(
                    f"| `{name}.{key}` | `{_cell(ast.unparse(node.annotation))}` | "
                    f"{_cell(_default(node))} | {_cell(_comments(lines, node))} |"
                )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is stale: run python scripts/make_config_docs.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
