"""The header line and the Markdown writer that `--markdown FILE` of the bench and the evaluation use."""
from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import torch

from captioner_train import report


def _git(root, *args) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_is_the_short_hash_and_dirty_only_for_tracked_changes(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-qm", "first")
    short = _git(tmp_path, "rev-parse", "--short", "HEAD")
    assert report.git_commit(tmp_path) == short
    (tmp_path / "new.txt").write_text("untracked\n")
    assert report.git_commit(tmp_path) == short, "a file git does not track leaves the commit clean"
    (tmp_path / "a.txt").write_text("two\n")
    assert report.git_commit(tmp_path) == short + "+dirty"
    assert report.git_commit(tmp_path / "nowhere") == "unknown"


def test_cpu_name_is_lscpus_model_name(monkeypatch):
    lscpu = "Architecture:  x86_64\nCPU(s):  2\nModel name:   AMD EPYC 7B13\nThread(s) per core:  2\n"
    monkeypatch.setattr(report.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=lscpu, stderr=""))
    assert report.cpu_name() == "AMD EPYC 7B13"


def test_header_names_machine_date_commit_torch_and_command(monkeypatch):
    monkeypatch.setattr(report, "cpu_name", lambda: "Test CPU 9000")
    monkeypatch.setattr(report, "git_commit", lambda root=report.ROOT: "abc1234+dirty")
    command = report.command_line("python -m captioner_train.bench", ["--repeats", "3", "--markdown", "my docs/b.md"])
    assert command == "python -m captioner_train.bench --repeats 3 --markdown 'my docs/b.md'", "quoted for a shell"
    line = report.header(command)
    assert line == (f"Machine: Test CPU 9000; date: {time.strftime('%Y-%m-%d', time.gmtime())}; commit: abc1234+dirty; "
                    f"torch {torch.__version__}; command: `{command}`")


def test_written_file_is_the_header_then_each_sentence_and_table(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "cpu_name", lambda: "Test CPU")
    tables = [("Columns: a and b.", "| a | b |\n|---|---|\n| 1 | 2.50 |"),
              ("Columns: c.", "| c |\n|---|\n| x y |\n| – |")]
    path = tmp_path / "docs" / "out.md"
    report.write_markdown(path, "python -m tool --flag", tables)
    text = path.read_text()
    header, first, table1, second, table2 = text.rstrip("\n").split("\n\n")
    assert header == report.header("python -m tool --flag") and text.endswith("|\n")
    assert (first, table1, second, table2) == (tables[0][0], tables[0][1], tables[1][0], tables[1][1])
    assert report.table_rows(text) == [["a", "b"], ["1", "2.50"], ["c"], ["x y"], ["–"]]


def test_launcher_names_the_module_run_as_main(monkeypatch):
    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__spec__=SimpleNamespace(name="other.evaluate")))
    assert report.launcher("captioner_train.evaluate") == "python -m other.evaluate"
    assert report.launcher("captioner_train.evaluate", 2) == "torchrun --nproc_per_node 2 -m other.evaluate"
    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__spec__=SimpleNamespace(name="tool.__main__")))
    assert report.launcher("x") == "python -m tool"
    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__spec__=None))  # `python path/to/file.py`
    assert report.launcher("captioner_train.bench") == "python -m captioner_train.bench"
