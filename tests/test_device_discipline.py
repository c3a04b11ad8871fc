"""Static device discipline of the package (CPU CI cannot run a GPU, so the code is read instead).

Under `loralens/`: every tensor factory call names its `device=`, no tensor is put on a hard-coded "cpu", and no
`.numpy()` is called on a tensor that may live on a GPU without `.cpu()` first. A line that is host-only by
design (numpy data read from files, CPU-side bookkeeping) says so with a `# host` comment; the test lists the
offending lines otherwise.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "loralens"
FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "linspace", "eye",
             "zeros_like", "ones_like", "full_like", "empty_like"}
LIKE = {"zeros_like", "ones_like", "full_like", "empty_like"}  # these follow their argument's device


def _is_torch_factory(node: ast.Call) -> bool:
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr in FACTORIES and isinstance(f.value, ast.Name)
            and f.value.id == "torch")


def _names_cpu(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value == "cpu"


def _ends_with_cpu(node: ast.AST) -> bool:
    """`x.cpu()`, `x.detach().cpu()`, `x.cpu().float()` ...: a `.cpu()` call somewhere down the receiver chain."""
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr == "cpu":
            return True
        node = node.func.value
    return False


def violations() -> list[str]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            why = None
            f = node.func
            if _is_torch_factory(node) and f.attr not in LIKE and not any(k.arg == "device" for k in node.keywords):
                why = f"torch.{f.attr}(...) without device="
            elif any(k.arg == "device" and _names_cpu(k.value) for k in node.keywords) or (
                    isinstance(f, ast.Attribute) and f.attr in ("to", "device") and node.args
                    and _names_cpu(node.args[0])):
                why = 'a hard-coded "cpu" device'
            elif isinstance(f, ast.Attribute) and f.attr == "numpy" and not node.args and not _ends_with_cpu(f.value):
                why = ".numpy() without .cpu()"
            if why is None:
                continue
            span = lines[node.lineno - 1:(node.end_lineno or node.lineno)]
            if not any("# host" in line for line in span):
                found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {why}: {lines[node.lineno - 1].strip()}")
    return found


def test_no_tensor_is_tied_to_the_host_by_accident():
    bad = violations()
    assert not bad, "mark host-only lines with `# host: why`, or give them a device:\n" + "\n".join(bad)


def test_the_checker_finds_each_kind(tmp_path, monkeypatch):
    """The checker itself: each kind of line is caught, and a `# host` comment clears it."""
    pkg = tmp_path / "loralens"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "import torch\n"
        "a = torch.zeros(3)\n"
        "b = torch.ones(2, device=x.device)\n"
        "c = y.to('cpu')\n"
        "d = z.numpy()\n"
        "e = z.detach().cpu().numpy()\n"
        "f = torch.zeros(1)  # host: a counter\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    got = [line.split(": ")[1] for line in violations()]
    assert got == ["torch.zeros(...) without device=", 'a hard-coded "cpu" device', ".numpy() without .cpu()"]
