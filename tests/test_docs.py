"""The docs: the generated reference blocks (config, stages, warehouse columns, modules) cover what the code has,
the strict MkDocs build passes, and the README's commands and API example are the ones CI and the code run."""

from __future__ import annotations

import ast
import html
import importlib.util
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import BaseModel, Field

from loralens.config import PipelineConfig
from loralens.warehouse.constants import STAGES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _load_hooks():
    spec = importlib.util.spec_from_file_location("loralens_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Return {first cell without backticks: the other cells} for every table row of `markdown`."""
    rows = {}
    for line in markdown.splitlines():
        if not line.startswith("| `"):
            continue
        cells = split_cells(line.strip())
        rows[cells[0].strip("`")] = cells[1:]
    return rows


def split_cells(line: str) -> list[str]:
    """Return the cells of a Markdown table row: split on pipes that are neither escaped nor in a code span."""
    cells, cell, in_code, i = [], "", False, 0
    while i < len(line):
        ch = line[i]
        if ch == "\\" and i + 1 < len(line) and line[i + 1] == "|" and not in_code:
            cell += "\\|"
            i += 2
            continue
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
        i += 1
    return cells[1:]


def code_value(cell: str):
    """Return the YAML value of a default cell: its first code span, parsed."""
    match = re.match(r"``? ?(.*?) ?``?(;|$)", cell)
    assert match, f"not a code span: {cell!r}"
    return yaml.safe_load(match.group(1))


def model_keys(model: type[BaseModel], prefix: str = "") -> dict[str, tuple[type[BaseModel], str]]:
    """Return every dotted key under `model` (list-of-model items as `key[].field`) -> (owning class, field name).

    Written independently of the generator's walk, from `model_fields` and the annotations' arguments."""
    out = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        out[key] = (model, name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= model_keys(ann, f"{key}.")
            continue
        stack = list(typing.get_args(ann))
        while stack:
            arg = stack.pop()
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                out |= model_keys(arg, f"{key}[].")
            else:
                stack += typing.get_args(arg)
    return out


def test_config_reference_lists_every_field_with_type_and_description():
    rows = table_rows(hooks.config_reference())
    keys = model_keys(PipelineConfig)
    assert len(keys) > 80  # every section of the pipeline, not an empty walk
    missing = sorted(set(keys) - set(rows))
    assert not missing, f"config keys missing from the reference: {missing}"
    assert not sorted(set(rows) - set(keys)), "rows for keys the config does not have"
    for key, (cls, name) in keys.items():
        field = cls.model_fields[name]
        if field.description:
            assert " ".join(field.description.split()) in html.unescape(rows[key][3].replace("\\|", "|")), key
        assert rows[key][0], f"{key}: no type"


def test_config_reference_defaults_rebuild_the_default_config(tmp_path, monkeypatch):
    """Every default, written as the reference writes it, read back as a config file gives PipelineConfig()."""
    monkeypatch.chdir(tmp_path)  # the home default is resolved against the working directory
    monkeypatch.delenv("LORALENS_HOME", raising=False)
    rows = table_rows(hooks.config_reference())
    keys = model_keys(PipelineConfig)
    data: dict = {}
    for key, (cls, name) in keys.items():
        if "[]" in key:  # an item of a list of models: its class's own default
            field = cls.model_fields[name]
            assert code_value(rows[key][1]) == field.get_default(call_default_factory=True), key
            continue
        if rows[key][1].startswith("see "):  # a section: its keys have rows of their own
            continue
        *parents, leaf = key.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = code_value(rows[key][1])
    assert PipelineConfig.model_validate(data) == PipelineConfig()
    assert data["home"] == "./.loralens"
    assert data["intervene"]["head_sets"][-1] == {"selected": True}


class _Item(BaseModel):
    """An item."""

    label: str = Field("x|y", description="a <b> & c | d")


class _Section(BaseModel):
    """A section."""

    mode: Literal["a", "b"] = "b"
    size: int = Field(3, gt=0, le=9, description="how many")
    items: tuple[_Item, ...] = (_Item(label="z"),)


class _Root(BaseModel):
    """The root."""

    where: Path = Field(default_factory=lambda: Path("/srv/home"))
    section: _Section = _Section(size=5)


def test_config_reference_works_for_any_model_tree():
    """The generator needs only a model class: it works however `loralens.config` is laid out (module or package)."""
    text = hooks.config_reference(_Root)
    rows = table_rows(text)
    assert set(rows) == {"where", "section", "section.mode", "section.size", "section.items",
                         "section.items[].label"}
    assert rows["where"][:2] == ["path", "`/srv/home`"]
    assert rows["section.size"][1:4] == ["`5`", "&gt; 0, &lt;= 9", "how many"]  # the section instance's default
    assert rows["section.mode"][0] == "one of a, b"
    assert rows["section.items"][1].startswith("`[{label: z}]`; items: [`section.items[]`](#sectionitems)")
    assert rows["section.items[].label"][1] == "`x|y`"
    assert rows["section.items[].label"][3] == "a &lt;b&gt; &amp; c \\| d"
    assert "### `section.items[]`" in text and "An item." in text


def test_stage_list_is_the_pipeline_and_every_stage_has_a_page_in_the_nav():
    text = hooks.stage_list()
    assert " -> ".join(STAGES) in text
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    stage_pages = next(item["Stages"] for item in nav if isinstance(item, dict) and "Stages" in item)
    assert [next(iter(p.values())) for p in stage_pages] == [f"stages/{s}.md" for s in STAGES]
    for stage in STAGES:
        assert f"[`{stage}`](stages/{stage}.md)" in text
        assert (ROOT / "docs" / "stages" / f"{stage}.md").is_file()
    assert "](../stages/cache.md)" in hooks.render("<!-- generated: stages -->", "sub/page.md")
    with pytest.raises(ValueError, match="unknown generated block"):
        hooks.render("<!-- generated: nope -->", "page.md")


def test_warehouse_columns_cover_every_table_and_column_of_the_schema():
    import duckdb

    from loralens.warehouse.schema import ensure_schema

    con = duckdb.connect(":memory:")
    ensure_schema(con)
    columns = con.execute("SELECT table_name, column_name FROM information_schema.columns").fetchall()
    tables = {t for t, _ in columns}
    text = hooks.warehouse_columns()
    sections = dict(re.findall(r"### `(\w+)` \((?:table|view)\)\n\n(.*?)(?=\n### |\Z)", text, re.S))
    assert set(sections) == tables and {"head_scores", "interventions", "top_toxic_heads"} <= tables
    for table, column in columns:
        assert f"| `{column}` |" in sections[table], (table, column)
    rows = table_rows(sections["interventions"])
    assert rows["emt_high"][1] == "expected maximum toxicity, 95% bootstrap"  # a comment shared by a line's columns
    assert rows["heads"][1] == '"L3H1,L5H0"'
    assert table_rows(sections["lens_fidelity"])["kl_lens"][1] == "held-out exact KL(model \\|\\| trained lens), " \
                                                                   "nats per token"


def test_module_index_lists_every_module():
    text = hooks.module_table()
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "loralens").rglob("*.py"))
    assert len(modules) > 50
    for module in modules:
        assert f"| `{module}` |" in text, module
    assert "| `loralens/tasks/stages/select.py` | The `select` stage: cheap causal scores" in text


def test_docs_build_in_strict_mode(tmp_path):
    """The site builds with broken links and anchors as errors, and the generated blocks are in it."""
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    config = (site / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "<code>train.rank</code>" in config and "generated:" not in config
    assert "<code>selection_path</code>" in (site / "warehouse" / "index.html").read_text(encoding="utf-8")
    assert not (site / "hooks.py").exists()


def test_readme_is_short_and_its_commands_are_the_ones_ci_runs_and_the_docs_show():
    assert len(README.splitlines()) <= 200
    run = "./scripts/install.sh && .venv/bin/loralens run"
    test = "./scripts/install.sh && .venv/bin/ruff check . && .venv/bin/python -m pytest -q"
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    for text in (README, index):
        assert f"```bash\n{run}\n```" in text
        assert f"```bash\n{test}\n```" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci and "mkdocs build --strict" in ci


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" not in target:
            assert (ROOT / target).exists(), target


def test_readme_api_example_runs_on_a_home(planted_run, capsys):
    """The README's Python example, run as written on a home from a real pipeline run (the tiny planted-head
    model): it finds the planted head first and prints its decoded tokens and a continuation."""
    from test_attribution import PLANTED

    config, _results, _db = planted_run
    block = re.search(r"## Python API\n.*?```python\n(.*?)```", README, re.S).group(1)
    assert block.count("\n") <= 20  # a short example
    assert 'loralens.open(".loralens")' in block
    code = block.replace('loralens.open(".loralens")', f"loralens.open({str(config['home'])!r})")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["head"] == f"L{PLANTED[0]}H{PLANTED[1]}"
    assert (Path(scope["folder"]) / "config.json").exists()  # the lenses saved and loaded back
    assert scope["same"].decode("You are such an", heads=PLANTED, k=5).top(PLANTED) == decoded_top(scope)
    printed = capsys.readouterr().out.splitlines()
    decoded = ast.literal_eval(printed[0])  # the list of (token, probability) pairs
    assert len(decoded) == 5 and all(isinstance(t, str) and 0 <= p <= 1 for t, p in decoded)
    assert len(printed) >= 2


def decoded_top(scope: dict) -> list:
    """Return the README's decoding of its head, recomputed with the home's lenses."""
    return scope["lenses"].decode("You are such an", heads=scope["head"], k=5).top(scope["head"])


def _doc_texts() -> dict[str, str]:
    pages = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md")}
    return {"README.md": README, **pages}


def _defines(module: Path, name: str) -> bool:
    """Return whether a module's source defines `name` at top level (a def, class, assignment or import)."""
    import ast

    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return True
    return False


def test_every_source_path_and_dotted_name_the_docs_mention_exists():
    """Module paths (`loralens/lens/heads/edits.py`, `...py:read_heads`) and dotted names
    (`loralens.lens.lenses.peft_io.export_head_adapter`) in the README and docs/ point at real code."""
    checked = 0
    for page, text in _doc_texts().items():
        for path, name in re.findall(r"`((?:loralens|tests|benchmarks|scripts|examples)/[\w/.-]*?)(?::(\w+))?`", text):
            assert (ROOT / path).exists(), f"{page}: {path}"
            if name:
                assert _defines(ROOT / path, name), f"{page}: {path}:{name}"
            checked += 1
        for dotted in re.findall(r"`(loralens(?:\.\w+)+)", text):
            parts = dotted.split(".")
            for i in range(len(parts), 0, -1):  # the longest prefix that is a module or package
                base = ROOT.joinpath(*parts[:i])
                module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
                if module.is_file():
                    break
            else:
                raise AssertionError(f"{page}: {dotted}")
            rest = parts[i:]
            assert len(rest) <= 1, f"{page}: {dotted} (no module {'.'.join(parts[:i + 1])})"
            if rest and not _defines(module, rest[0]):  # e.g. the lazy `loralens.open`: ask the module itself
                assert hasattr(importlib.import_module(".".join(parts[:i])), rest[0]), f"{page}: {dotted}"
            checked += 1
    assert checked > 80


def test_install_script_refuses_an_unknown_torch_build_before_touching_anything(tmp_path):
    """`TORCH=rocm ./scripts/install.sh` stops in one line, exit 2, before making a venv."""
    import shutil

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "install.sh", repo / "scripts" / "install.sh")
    proc = subprocess.run(["bash", str(repo / "scripts" / "install.sh")], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "TORCH": "rocm"})
    assert proc.returncode == 2 and proc.stderr == "install.sh: TORCH must be cpu or cuda, got 'rocm'\n"
    assert not (repo / ".venv").exists()
