"""MkDocs hook: the parts of the reference that are generated from the code at build time, so they cannot go stale.

A page asks for a generated block with a marker on a line of its own:

    <!-- generated: config-reference -->    every section and key of `loralens.config.PipelineConfig`
    <!-- generated: stages -->              the pipeline's stages, in order, each linked to its page
    <!-- generated: warehouse-columns -->   every DuckDB table and view with its columns, types and comments
    <!-- generated: modules -->             every module of `loralens/`, by folder, with its docstring's first sentence

The generators are plain functions (`config_reference`, `stage_list`, `warehouse_columns`,
`module_table`) that tests call too
(`tests/test_docs.py`); `python docs/hooks.py config-reference` prints one block to stdout.
"""

from __future__ import annotations

import html
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)


def _checkout_first() -> None:
    """Import `loralens` from the checkout being documented, not from another installed copy."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------------------------
# the stage list


def stage_names() -> list[str]:
    """Return the pipeline's stages in run order: the one place the docs learn them from."""
    _checkout_first()
    from loralens.tasks.registry import stage_names as registered

    return list(registered())


def stage_list(page_dir: str = "stages") -> str:
    """Return Markdown: the pipeline diagram and the stages in order, each linked to `<page_dir>/<stage>.md`."""
    names = stage_names()
    lines = ["```", " -> ".join(names), "```", ""]
    lines += [f"{i}. [`{name}`]({page_dir}/{name}.md)" for i, name in enumerate(names, 1)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the configuration reference


def _yaml(value: Any) -> str:
    """Return `value` as one line of YAML (flow style), the way a config file would write it."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text.removesuffix("\n...").strip()


def _plain(value: Any) -> Any:
    """Return `value` as YAML-safe data: models as their non-default keys, tuples as lists, paths as strings."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return {k: _plain(v) for k, v in value.model_dump(exclude_defaults=True).items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        try:  # a default resolved against the working directory: shown relative to it
            rel = value.relative_to(Path.cwd())
            return f"./{rel.as_posix()}" if rel.parts else "."
        except ValueError:
            return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    from pydantic_core import to_jsonable_python  # anything else (an enum, a date, ...) as pydantic would dump it

    return to_jsonable_python(value)


def default_text(value: Any) -> str:
    """Return a default value as it would be written in a YAML config file (one line)."""
    return _yaml(_plain(value))


def _models_in(annotation: Any) -> list[type]:
    """Return the pydantic model classes inside an annotation (`X`, `X | None`, `tuple[X, ...]`, ...)."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type] = []
    for arg in typing.get_args(annotation):
        out += [m for m in _models_in(arg) if m not in out]
    return out


def type_text(annotation: Any) -> str:
    """Return a short readable name of a field's type: `int`, `int | null`, `list of str`, `one of a, b`."""
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(_yaml(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin in (tuple, list, set, frozenset):
        item = args[0] if args else Any
        return f"list of {type_text(item)}"
    if origin is dict:
        return f"mapping {type_text(args[0])} -> {type_text(args[1])}" if args else "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation.__name__
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def constraint_text(field: Any) -> str:
    """Return a field's value constraints (`> 0`, `<= 1`, `matches ...`) from its pydantic metadata."""
    marks = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >=", "max_length": "length <="}
    out = []
    for meta in field.metadata:
        for attr, sign in marks.items():
            if getattr(meta, attr, None) is not None:
                out.append(f"{sign} {getattr(meta, attr)}")
        if getattr(meta, "pattern", None):
            out.append(f"matches `{meta.pattern}`")
    return ", ".join(out)


def _cell(text: str) -> str:
    """Return `text` as one table cell: one line; outside code spans, pipes escaped and `<`, `>`, `&` as entities
    (Python-Markdown keeps a pipe inside backticks in its cell, and shows a backslash there literally)."""
    parts = " ".join(text.split()).split("`")
    return "`".join(p if i % 2 else html.escape(p, quote=False).replace("|", "\\|") for i, p in enumerate(parts))


def _code(text: str) -> str:
    """Return `text` as an inline code span (backticks inside it get a longer fence)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def config_sections(model: type | None = None) -> list[tuple[str, type, Any]]:
    """Return every (dotted section name, model class, default instance or None) reachable from PipelineConfig.

    The top level is `""`; a nested model is its own section; the items of a list of models (e.g.
    `intervene.head_sets`) are a section named `intervene.head_sets[]` whose defaults are the item class's own.
    """
    if model is None:
        _checkout_first()
        from loralens.config import PipelineConfig

        model = PipelineConfig
    out: list[tuple[str, type, Any]] = []

    def walk(prefix: str, cls: type, instance: Any) -> None:
        out.append((prefix, cls, instance))
        for name, field in cls.model_fields.items():
            key = f"{prefix}.{name}" if prefix else name
            for sub in _models_in(field.annotation):
                direct = field.annotation is sub
                child = getattr(instance, name, None) if direct and instance is not None else None
                if not direct:
                    key_ = f"{key}[]"
                    if key_ not in [s for s, _, _ in out]:
                        walk(key_, sub, None)  # an item's defaults are its class's own
                else:
                    walk(key, sub, child)

    walk("", model, model())
    return out


def field_default(cls: type, instance: Any, name: str) -> tuple[bool, Any]:
    """Return (has a default, the default): the section instance's value, else the field's own default."""
    if instance is not None:
        return True, getattr(instance, name)
    field = cls.model_fields[name]
    if field.is_required():
        return False, None
    return True, field.get_default(call_default_factory=True)


def config_reference(model: type | None = None, heading_level: int = 3) -> str:
    """Return Markdown: one table per config section (key, type, default, constraints, description).

    Walks `loralens.config.PipelineConfig` (or `model`) through pydantic's `model_fields`: every section, every
    key, its annotation, its default (as a config file would write it) and its `description`. Keys that are
    themselves sections are listed with a link to their table instead of a default.
    """
    sections = config_sections(model)
    names = {s for s, _, _ in sections}
    lines: list[str] = []
    for section, cls, instance in sections:
        title = f"`{section}`" if section else "top level"
        lines += [f"{'#' * heading_level} {title}", ""]
        doc = (cls.__doc__ or "").strip().split("\n\n")[0]
        if doc and not doc.startswith("Usage docs"):
            lines += [" ".join(doc.split()), ""]
        lines += ["| key | type | default | constraints | description |", "|---|---|---|---|---|"]
        for name, field in cls.model_fields.items():
            key = f"{section}.{name}" if section else name
            if key in names or f"{key}[]" in names:
                sub = key if key in names else f"{key}[]"
                anchor = _anchor(sub)
                if key in names:
                    default = f"see [`{sub}`](#{anchor})"
                else:
                    has, value = field_default(cls, instance, name)
                    default = (_code(default_text(value)) if has else "required") + f"; items: [`{sub}`](#{anchor})"
            else:
                has, value = field_default(cls, instance, name)
                default = _code(default_text(value)) if has else "required"
            lines.append(f"| `{key}` | {_cell(type_text(field.annotation))} | {default} | "
                         f"{_cell(constraint_text(field))} | {_cell(field.description or '')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _anchor(section: str) -> str:
    """Return the id MkDocs' toc extension gives the heading "`<section>`"."""
    return re.sub(r"[^\w\- ]", "", section).strip().lower().replace(" ", "-")


# ---------------------------------------------------------------------------------------------------------------
# the warehouse columns


def warehouse_objects() -> list[dict[str, Any]]:
    """Return every table and view of the warehouse schema, in schema order: name, kind, columns.

    Creates the schema in an in-memory DuckDB (the authority on names and types) and takes each column's
    meaning from the `-- comment` on its line of `loralens.warehouse.schema.SCHEMA_SQL`.
    """
    _checkout_first()
    import duckdb

    from loralens.warehouse.schema import SCHEMA_SQL, ensure_schema

    con = duckdb.connect(":memory:")
    ensure_schema(con)
    order = [m.group(2) for m in re.finditer(r"CREATE (?:TABLE IF NOT EXISTS|OR REPLACE VIEW) (\w+\.)?(\w+)",
                                             SCHEMA_SQL)]
    kinds = dict(con.execute("SELECT table_name, table_type FROM information_schema.tables").fetchall())
    comments = _column_comments(SCHEMA_SQL)
    out = []
    for name in order:
        cols = con.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ? "
                           "ORDER BY ordinal_position", [name]).fetchall()
        out.append({"name": name, "kind": "view" if kinds.get(name) == "VIEW" else "table",
                    "columns": [(c, t, comments.get((name, c), "")) for c, t in cols]})
    con.close()
    return out


def _column_comments(sql: str) -> dict[tuple[str, str], str]:
    """Return {(table, column): comment} from `name TYPE ..., -- comment` lines inside CREATE TABLE blocks."""
    out: dict[tuple[str, str], str] = {}
    table = None
    for line in sql.splitlines():
        start = re.match(r"\s*CREATE TABLE IF NOT EXISTS (\w+)", line)
        if start:
            table = start.group(1)
            continue
        if table is None:
            continue
        if line.strip().startswith(");"):
            table = None
            continue
        code, _, comment = line.partition("--")
        for col in re.findall(r"(?:^|,)\s*(\w+)\s+[A-Z]", code):
            if col.upper() not in ("PRIMARY", "UNIQUE", "FOREIGN", "CHECK"):
                out[(table, col)] = comment.strip()
    return out


def warehouse_columns(heading_level: int = 3) -> str:
    """Return Markdown: one table per warehouse table or view (column, type, meaning)."""
    lines: list[str] = []
    for obj in warehouse_objects():
        lines += [f"{'#' * heading_level} `{obj['name']}` ({obj['kind']})", "",
                  "| column | type | meaning |", "|---|---|---|"]
        lines += [f"| `{c}` | {_cell(t)} | {_cell(m)} |" for c, t, m in obj["columns"]]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------------------
# the module index


def _summary(doc: str) -> str:
    """Return the first sentence of a docstring's first paragraph (or the whole paragraph if it has no end)."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", para)
    return (match.group(1) if match else para).removesuffix(":")


def module_index(package: str = "loralens") -> list[tuple[str, str, str]]:
    """Return (package folder, module path, summary) for every module of the package, read with `ast` (nothing is
    imported), packages before their modules, in path order."""
    import ast

    root = ROOT / package
    out = []
    for path in sorted(root.rglob("*.py"), key=lambda p: (p.parent.relative_to(root).parts, p.name != "__init__.py",
                                                          p.name)):
        if "__pycache__" in path.parts:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        rel = path.relative_to(ROOT).as_posix()
        out.append((path.parent.relative_to(ROOT).as_posix(), rel, _summary(doc)))
    return out


def module_table(heading_level: int = 3) -> str:
    """Return Markdown: per package folder, a table of its modules and the first sentence of each docstring."""
    lines: list[str] = []
    current = None
    for folder, rel, summary in module_index():
        if folder != current:
            if current is not None:
                lines.append("")
            lines += [f"{'#' * heading_level} `{folder}/`", "", "| module | what it is |", "|---|---|"]
            current = folder
        lines.append(f"| `{rel}` | {_cell(summary) or '-'} |")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------------------
# MkDocs


GENERATORS = {
    "config-reference": config_reference,
    "stages": stage_list,
    "warehouse-columns": warehouse_columns,
    "modules": module_table,
}


def render(markdown: str, page_path: str = "") -> str:
    """Return `markdown` with every `<!-- generated: NAME -->` line replaced by its generated block."""
    depth = page_path.replace("\\", "/").count("/")

    def block(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"{page_path}: unknown generated block '{name}' (known: {', '.join(GENERATORS)})")
        if name == "stages":
            return stage_list(page_dir="../" * depth + "stages")
        return GENERATORS[name]()

    return MARKER.sub(block, markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs event: fill the generated blocks of a page before it is rendered."""
    return render(markdown, page.file.src_uri)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in GENERATORS:
        sys.exit(f"usage: python docs/hooks.py {{{','.join(GENERATORS)}}}")
    print(GENERATORS[sys.argv[1]]())
