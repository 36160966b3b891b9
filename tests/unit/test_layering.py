"""Import directions and kernel-only calls of style.md §4, checked on every .py file of the pack with ``ast``.

* Only the pack's ``__init__.py`` and ``nodes.py`` import ComfyUI; ``__init__.py`` imports only ``nodes``.
* Core code imports the pack relatively (never ``infinitetalk.*`` or ``wanvideo.*`` absolutely).
* ``wanvideo`` never imports ``multitalk``, ``blockswap`` or ``nodes``; ``multitalk`` imports only ``wanvideo``,
  ``attention`` and ``fp8_optimization``; the kernel modules import no other pack module (except a kernel's own
  helper module, e.g. ``quant_formats`` for ``fp8_optimization``, which counts as part of that kernel).
* ``tools/`` and ``benchmarks/`` use the core only (no ComfyUI, no ``nodes``); ``tests/`` may import anything.
* The core import graph has no cycles.
* ``.contiguous(`` appears only in the kernel modules and their helpers (and tests, benchmarks, tools).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "infinitetalk"
COMFY = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "comfy_config", "folder_paths", "server",
         "node_helpers", "nodes", "execution", "latent_preview"}
KERNELS = {"attention", "fp8_optimization", "blockswap"}
# Private helper modules split out of one kernel module: same rules as their owner, importable only by it and by
# the core that may import the owner.
KERNEL_HELPERS = {"quant_formats": "fp8_optimization", "quant_runtime": "fp8_optimization",
                  "quant_kernel_choice": "fp8_optimization", "compiled_kernels": "fp8_optimization",
                  "quant_gemm": "fp8_optimization", "quant_triton": "fp8_optimization",
                  "attention_kernels": "attention", "attention_triton": "attention"}
PACK_TOP = {"wanvideo", "multitalk", "nodes", *KERNELS, *KERNEL_HELPERS}
OUTSIDE_CORE = ("tests", "tools", "benchmarks")
CONTIGUOUS_OK = {f"{k}.py" for k in (*KERNELS, *KERNEL_HELPERS)}
SKIP_DIRS = {"__pycache__", "node_modules", "web", "workflows"}


@dataclass(frozen=True)
class Import:
    """One import statement target: ``absolute`` top-level name, or the resolved pack module for relative ones."""

    file: str
    line: int
    absolute: str | None
    internal: str | None
    dotted: str = ""


def pack_files() -> list[Path]:
    files = []
    for path in sorted(PACK_ROOT.rglob("*.py")):
        rel = path.relative_to(PACK_ROOT)
        if any(part.startswith(".") or part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        files.append(rel)
    return files


def module_of(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(rel: Path, level: int, module: str | None) -> str:
    package = list(rel.parts[:-1])
    if level - 1 > len(package):
        raise AssertionError(f"{rel}: relative import goes above the pack root")
    base = package[: len(package) - (level - 1)]
    return ".".join(base + (module.split(".") if module else []))


def _is_module(name: str) -> bool:
    path = PACK_ROOT.joinpath(*name.split(".")) if name else PACK_ROOT
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def top(name: str) -> str:
    return name.split(".")[0]


def imports_of(rel: Path, source: str | None = None) -> list[Import]:
    """Every import in file ``rel`` (its text is read unless ``source`` is given)."""
    text = source if source is not None else (PACK_ROOT / rel).read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(text, filename=str(rel))):
        if isinstance(node, ast.Import):
            found += [Import(str(rel), node.lineno, top(a.name), None, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found += [Import(str(rel), node.lineno, top(node.module), None, f"{node.module}.{a.name}")
                      for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(rel, node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.append(Import(str(rel), node.lineno, None, sub if _is_module(sub) else target))
    return found


def allowed_internal(module: str, target: str) -> bool:
    """Whether pack module ``module`` may import pack module ``target`` (style.md §4)."""
    src, dst = top(module), top(target)
    if module == "":
        return target == "nodes"
    if src in KERNELS or src in KERNEL_HELPERS:  # a kernel and its helpers: only helpers of the same kernel
        return dst != src and KERNEL_HELPERS.get(dst) == KERNEL_HELPERS.get(src, src)
    dst = KERNEL_HELPERS.get(dst, dst)
    if src == "wanvideo":
        return dst in ("wanvideo", "attention", "fp8_optimization")
    if src == "multitalk":
        return dst in ("multitalk", "wanvideo", "attention", "fp8_optimization")
    return src == "nodes" or src in OUTSIDE_CORE


def violations(rel: Path, found: list[Import]) -> list[str]:
    """Import-direction problems of one file (empty for tests/)."""
    area = rel.parts[0] if len(rel.parts) > 1 else ""
    if area == "tests":
        return []
    module, bad = module_of(rel), []
    for i in found:
        where = f"{i.file}:{i.line}"
        if i.absolute in COMFY and str(rel) not in ("nodes.py", "__init__.py"):
            bad.append(f"{where} imports ComfyUI module {i.absolute!r} (only nodes.py / __init__.py may)")
        if area not in OUTSIDE_CORE and i.absolute in (PACK_TOP - {"nodes"}) | {PACKAGE}:
            bad.append(f"{where} imports the pack absolutely ({i.absolute!r}); use a relative import")
        if area in ("tools", "benchmarks") and i.dotted.startswith(f"{PACKAGE}.nodes"):
            bad.append(f"{where} imports the pack's nodes (tools/benchmarks use the core only)")
        if area not in OUTSIDE_CORE and i.internal is not None and not allowed_internal(module, i.internal):
            bad.append(f"{where} imports {i.internal or '<pack root>'} (not allowed from {module or '__init__'})")
    return bad


def all_imports() -> dict[Path, list[Import]]:
    return {rel: imports_of(rel) for rel in pack_files()}


def test_pack_files_are_found():
    files = {str(f) for f in pack_files()}
    assert {"attention.py", "wanvideo/model.py", "multitalk/model.py"} <= files
    assert not any(f.startswith(".cache") for f in files)


def test_import_directions_of_every_file():
    bad = [v for rel, found in all_imports().items() for v in violations(rel, found)]
    assert not bad, "import rule violations (style.md §4):\n" + "\n".join(bad)


def test_core_import_graph_has_no_cycles():
    graph: dict[str, set[str]] = {}
    for rel, found in all_imports().items():
        if rel.parts[0] not in OUTSIDE_CORE:
            graph.setdefault(module_of(rel), set()).update(i.internal for i in found if i.internal)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            pytest.fail("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        state[node] = 2

    for module in sorted(graph):
        visit(module, [])


def test_contiguous_only_in_kernel_modules():
    bad = []
    for rel in pack_files():
        if rel.parts[0] in OUTSIDE_CORE or str(rel) in CONTIGUOUS_OK:
            continue
        for n, line in enumerate((PACK_ROOT / rel).read_text(encoding="utf-8").splitlines(), 1):
            if ".contiguous(" in line:
                bad.append(f"{rel}:{n}: {line.strip()}")
    assert not bad, ".contiguous() belongs in attention.py / fp8_optimization.py / blockswap.py:\n" + "\n".join(bad)


@pytest.mark.parametrize("path, source", [
    ("wanvideo/x.py", "from ..multitalk import model"),
    ("wanvideo/x.py", "from ..blockswap import BlockSwapper"),
    ("wanvideo/x.py", "import folder_paths"),
    ("multitalk/x.py", "from comfy import model_management"),
    ("multitalk/x.py", "from ..nodes import X"),
    ("multitalk/x.py", "from infinitetalk.wanvideo.model import WanModel"),
    ("fp8_optimization.py", "from .attention import resolve"),
    ("attention.py", "from .wanvideo import model"),
    ("blockswap.py", "from .multitalk.model import InfiniteTalkModel"),
    ("__init__.py", "from .wanvideo import model"),
    ("attention.py", "from .quant_formats import E4M3"),
    ("quant_formats.py", "from .fp8_optimization import ops_for"),
    ("tools/x.py", "import comfy.ops"),
    ("benchmarks/x.py", "from infinitetalk import nodes"),
])
def test_checker_rejects_known_violations(path, source):
    rel = Path(path)
    assert violations(rel, imports_of(rel, source)), source


@pytest.mark.parametrize("path, source", [
    ("wanvideo/x.py", "from ..attention import resolve\nfrom .config import WanConfig"),
    ("multitalk/x.py", "from ..wanvideo.model import WanModel\nfrom ..fp8_optimization import ops_for"),
    ("nodes.py", "import folder_paths\nfrom .multitalk import model"),
    ("__init__.py", "from .nodes import NODE_CLASS_MAPPINGS"),
    ("fp8_optimization.py", "from .quant_formats import E4M3"),
    ("tests/x.py", "import comfy\nfrom infinitetalk.nodes import X"),
])
def test_checker_accepts_allowed_imports(path, source):
    rel = Path(path)
    assert violations(rel, imports_of(rel, source)) == []
