"""The pure core stays pure: no module of `wacored.core` imports an I/O library, or any part of
wacored outside `core` and `config` (which are pure too). Policy is tested without servers or clocks;
this test keeps it possible."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "wacored" / "core"
FORBIDDEN = {
    "trio",
    "httpx",
    "h11",
    "sqlite3",
    "sqlite_utils",
    "psycopg",
    "psycopg_pool",
    "hypercorn",
    "quart",
    "quart_trio",
    "prometheus_client",
    "opentelemetry",
    "socket",
    "ssl",
    "subprocess",
    "asyncio",
    "anyio",
}
ALLOWED_WACORED = {"core", "config"}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute (``..config`` from a core module is ``wacored.config``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add(node.module or "")
            else:
                base = ["wacored", "core"][: 2 - (node.level - 1)]
                found.add(".".join([*base, *([node.module] if node.module else [])]))
    return found


def test_the_core_imports_no_io_and_nothing_outside_core_and_config() -> None:
    modules = sorted(CORE.glob("*.py"))
    assert len(modules) > 5
    for path in modules:
        for name in imports(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN, f"{path.name} imports {name}"
            if top == "wacored":
                assert name.split(".")[1] in ALLOWED_WACORED, f"{path.name} imports {name}"


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nfrom ..store import Reader\nfrom .routing import x\n")
    assert imports(bad) == {"trio", "wacored.store", "wacored.core.routing"}
