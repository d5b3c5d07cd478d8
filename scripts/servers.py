"""The app on a free 127.0.0.1 port, for the tests and scripts/loadtest.py: in this process (`launch`) or as
`python app.py` in its own (`start_app`, `app_running`).

Gradio 6.31 cannot be given port 0 (its URL would say ":0" and `launch` fails checking that URL), nor a socket
already bound. So the kernel is asked for a free port (bind to port 0, read the port, close) and Gradio is given
that number, and another process may take the port in between. Then:
- `launch(server_port=P)` tries P alone: its bind fails and it raises OSError("Cannot find empty port ..."), and
  `launch` below asks for another port and launches again;
- `python app.py` with GRADIO_SERVER_PORT=P tries P, P+1, ... (100 ports) itself, so `start_app` reads the port
  it got from the "Running on local URL: ..." line it prints, which Gradio prints once its server is listening.
Either way the URL is the one our server listens on, never a port someone else took.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
ATTEMPTS = 5  # ports `launch` tries: losing the race for a port even once is rare
LOST_RACE = "Cannot find empty port"  # Gradio's OSError when the port it was given is taken
STARTED = "Running on local URL:"  # what `python app.py` prints, with its URL, once it serves


def free_port() -> int:
    """A port nobody listens on right now (it may be taken before it is used: see the module's docstring)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def launch(demo, **kwargs) -> str:
    """`demo.launch(...)` on a free port of 127.0.0.1 without blocking; `kwargs` go to `launch` (e.g. show_error).
    -> the base URL, without a trailing /. Close it with `demo.close()`."""
    for attempt in range(ATTEMPTS):
        try:
            _, url, _ = demo.launch(server_name=HOST, server_port=free_port(), prevent_thread_lock=True, quiet=True,
                                    share=False, ssr_mode=False, **kwargs)
            return url.rstrip("/")
        except OSError as e:
            if LOST_RACE not in str(e) or attempt == ATTEMPTS - 1:
                raise


@dataclass
class App:
    """A running `python app.py`."""
    process: subprocess.Popen
    url: str  # base URL, with a trailing /
    log: Path  # its stdout and stderr

    def output(self, chars: int = 6000) -> str:
        """The end of what the server printed."""
        return _tail(self.log, chars)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _tail(path: Path, chars: int = 6000) -> str:
    text = path.read_text(errors="replace")
    return text if len(text) <= chars else "..." + text[-chars:]


def start_app(env: dict | None = None, startup_s: float = 300, log: Path | None = None) -> App:
    """`python app.py` on a free port of 127.0.0.1, with this process's environment and `env` (e.g. CAPTIONER_MODEL;
    a variable set to None is left out). Its output goes to the file `log` (default: a new temporary file), never
    to a pipe: one nobody reads fills up and stalls the server. `startup_s` only stops a server that hangs. Raises
    RuntimeError, with the server's output, when it exits or hangs before serving."""
    log = Path(log or tempfile.NamedTemporaryFile(prefix="app-", suffix=".log", delete=False).name)
    env = {**os.environ, "GRADIO_SERVER_NAME": HOST, "GRADIO_SERVER_PORT": str(free_port()),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    with open(log, "w") as out:  # the child keeps its own handle
        process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        # "Running on local URL:  http://127.0.0.1:7861" (with SSR, ", with SSR ..." follows the URL)
        started = re.search(re.escape(STARTED) + r"\s*(https?://[^\s,]+)", log.read_text(errors="replace"))
        if started:
            return App(process, started[1].rstrip("/") + "/", log)
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with status {process.returncode} before serving; its output "
                               f"({log}):\n{_tail(log)}")
        time.sleep(0.2)
    App(process, "", log).stop()
    raise RuntimeError(f"app.py did not serve within {startup_s:.0f} s; its output ({log}):\n{_tail(log)}")


@contextmanager
def app_running(env: dict | None = None, startup_s: float = 300, log: Path | None = None):
    """`start_app` as a context manager that stops the server on leaving (and deletes its log when all went well).
    An exception raised inside (a failed assertion) gets the server's output as a note, so the test report shows
    what the server said."""
    app = start_app(env, startup_s, log)
    try:
        yield app
    except Exception as e:
        e.add_note(f"app.py's output ({app.log}):\n{app.output()}")
        raise
    finally:
        app.stop()
    app.log.unlink(missing_ok=True)
