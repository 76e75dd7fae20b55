"""Conventions a test can keep: test modules never import each other (shared helpers live in
tests/support.py), so running or changing one module never drags another's fixtures along."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_test_modules_never_import_each_other() -> None:
    importing = re.compile(r"^\s*from (?:\.|tests\.)test_\w+ import|^\s*import tests\.test_", re.M)
    offenders = sorted(p.name for p in TESTS.glob("*.py") if importing.search(p.read_text()))
    assert offenders == []
