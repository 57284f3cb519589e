"""The wings import only downward: every module's imports, read with `ast`, against the table in the README.

| wing | folder | never imports |
|---|---|---|
| offload.oip | proto/ | offload.router, offload.edge, offload.cloud, offload.tools, torch, onnxruntime |
| offload.router | router/ | offload.edge, offload.cloud, offload.tools, torch, onnxruntime |
| offload.edge | edge/ | offload.cloud, offload.tools, torch |
| offload.cloud | cloud/ | offload.edge, offload.router, offload.tools, onnxruntime |
| offload.tools | tools/ | (may import everything) |

Lazy imports inside functions count too: a layer that imports upward "only when needed" still drags
the upper layer into every install that uses it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "oip": ("offload.router", "offload.edge", "offload.cloud", "offload.tools", "torch", "onnxruntime"),
    "router": ("offload.edge", "offload.cloud", "offload.tools", "torch", "onnxruntime"),
    "edge": ("offload.cloud", "offload.tools", "torch"),
    "cloud": ("offload.edge", "offload.router", "offload.tools", "onnxruntime"),
    "tools": (),
}
FOLDERS = {"oip": "proto", "router": "router", "edge": "edge", "cloud": "cloud", "tools": "tools"}


def imported_modules(source: str) -> Iterator[tuple[int, str]]:
    """Every module a source file imports, anywhere in it (top level, functions, TYPE_CHECKING blocks)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            # `from offload import cloud` names a wing as an attribute.
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def wing_modules(wing: str) -> list[Path]:
    folder = ROOT / FOLDERS[wing] / "offload" / wing
    return sorted(path for path in folder.rglob("*.py") if "_pb2" not in path.name)


def violations(wing: str) -> list[str]:
    found = []
    for path in wing_modules(wing):
        for line, module in imported_modules(path.read_text()):
            for banned in FORBIDDEN[wing]:
                if module == banned or module.startswith(banned + "."):
                    found.append(
                        f"{path.relative_to(ROOT)}:{line} imports {module} (offload.{wing} never imports {banned})"
                    )
    return found


@pytest.mark.parametrize("wing", sorted(FORBIDDEN))
def test_wing_imports_only_downward(wing: str) -> None:
    assert wing_modules(wing), f"no modules found for offload.{wing}: the test would pass vacuously"
    assert violations(wing) == []


def test_the_checker_sees_lazy_and_from_imports() -> None:
    source = "import torch.nn\nfrom offload import cloud\ndef f():\n    from offload.edge.agent import run\n"
    assert [module for _, module in imported_modules(source)] == [
        "torch.nn",
        "offload",
        "offload.cloud",
        "offload.edge.agent",
        "offload.edge.agent.run",
    ]


def test_no_offload_namespace_init() -> None:
    """PEP 420: `offload` is assembled from the wing folders, so none of them may own it."""
    assert not [str(path) for path in ROOT.glob("*/offload/__init__.py")]


def test_router_and_wire_import_without_onnxruntime_or_torch() -> None:
    """What a base install (`pip install .`, no extras) can do: route and speak OIP with neither runtime."""
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'onnxruntime'):\n"
        "            raise ImportError(f'{name} is not installed (blocked by the test)')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import offload.oip.server, offload.oip.client, offload.oip.settings, offload.oip.repository\n"
        "import offload.router, offload.router.core, offload.router.upstream, offload.router.calibration\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime')))\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
