"""The layers import one way: the page (`app.py`, `page/`) uses `captioner`; `captioner_train` uses `captioner`;
`captioner` uses neither, and never Gradio (a Space imports it with the page, a batch job without)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

_IMPORT_ALL = """
import json, pkgutil, importlib, sys
import captioner
for m in pkgutil.walk_packages(captioner.__path__, "captioner."):
    importlib.import_module(m.name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("captioner_train", "gradio", "page", "spaces", "servers", "app"))))
"""


def test_importing_the_library_loads_neither_the_training_side_nor_the_page_nor_gradio():
    """Every module of `captioner`, in a fresh interpreter so that nothing another test imported counts."""
    run = subprocess.run([sys.executable, "-c", _IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
