"""`scripts/mutations.py` follows the code: every wrong change still applies exactly once, and every test named to
catch it exists and runs in the default suite. Reads files only; `scripts/mutate.py` makes the changes."""
from __future__ import annotations

import ast
import functools
import importlib.util
import sys

import pytest

from conftest import ROOT


def _mutations():
    spec = importlib.util.spec_from_file_location("mutations", ROOT / "scripts" / "mutations.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("mutations", module)
    spec.loader.exec_module(module)
    return module.MUTATIONS


MUTATIONS = _mutations()


@functools.cache
def _tests_in(path) -> dict[str, bool]:
    """{test function name: marked slow} for the test functions of a file, top level or in classes."""
    tree = ast.parse(path.read_text())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            found[node.name] = any("slow" in ast.unparse(d) for d in node.decorator_list)
    return found


def test_names_are_unique():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


@pytest.mark.parametrize("m", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_change_applies_exactly_once_and_its_tests_exist(m):
    text = (ROOT / m.path).read_text()
    assert text.count(m.old) == 1, f"the old text occurs {text.count(m.old)} times in {m.path}: move the change " \
                                   "with the code it breaks"
    assert m.new != m.old and m.tests
    for node in m.tests:
        file, _, name = node.partition("::")
        assert (ROOT / file).is_file(), f"{file} does not exist"
        if name:
            tests = _tests_in(ROOT / file)
            function = name.split("[")[0]
            assert function in tests, f"{file} has no test {function}"
            assert not tests[function], f"{node} is slow: the default suite would not run it"
