"""scripts/servers.py: the app starts on a free port even when another process takes the port first, and a server
that fails says why in the test report."""
from __future__ import annotations

import socket

import pytest

import servers


@pytest.fixture
def taken_port():
    """A port another process listens on (as when a port is taken between asking for it and binding it)."""
    with socket.socket() as s:
        s.bind((servers.HOST, 0))
        s.listen()
        yield s.getsockname()[1]


def _ports_starting_with(monkeypatch, first: int) -> list[int]:
    """Make servers.free_port return `first` once, then free ports; -> the ports it returned."""
    given, real = [], servers.free_port
    monkeypatch.setattr(servers, "free_port", lambda: given.append(first if not given else real()) or given[-1])
    return given


def test_launch_takes_another_port_when_its_port_is_taken(monkeypatch, taken_port):
    import gradio as gr
    import httpx

    given = _ports_starting_with(monkeypatch, taken_port)
    with gr.Blocks() as demo:
        gr.Markdown("a page")
    url = servers.launch(demo)
    try:
        assert len(given) == 2 and url == f"http://{servers.HOST}:{given[1]}"
        assert httpx.get(f"{url}/config", timeout=60).status_code == 200
    finally:
        demo.close()


def test_app_py_serves_on_the_port_gradio_took_and_a_failure_shows_its_output(monkeypatch, taken_port, tiny_dir,
                                                                             tmp_path):
    """app.py is given a taken port: Gradio moves on to the next free one, and the URL is that one's. An
    assertion that fails while it runs carries the server's output."""
    from gradio_client import Client

    given = _ports_starting_with(monkeypatch, taken_port)
    with pytest.raises(AssertionError, match="a failing test") as failed:
        with servers.app_running({"CAPTIONER_MODEL": tiny_dir, "CAPTIONER_EXTRA_MODELS": None},
                                 log=tmp_path / "app.log") as app:
            endpoints = Client(app.url, analytics_enabled=False, verbose=False).view_api(
                print_info=False, return_format="dict")["named_endpoints"]
            raise AssertionError("a failing test")
    assert given == [taken_port] and app.url.startswith(f"http://{servers.HOST}:")
    assert app.url != f"http://{servers.HOST}:{taken_port}/", "the URL is the port Gradio took, not the one asked"
    assert "/caption" in endpoints
    assert any(servers.STARTED in note for note in failed.value.__notes__), "the report shows the server's output"
    assert app.process.poll() is not None, "the server was stopped"


def test_app_py_that_cannot_start_raises_with_its_output(tmp_path):
    with pytest.raises(RuntimeError, match="exited with status") as failed:
        servers.start_app({"CAPTIONER_MODEL": str(tmp_path / "no-model-here"), "CAPTIONER_EXTRA_MODELS": None},
                          log=tmp_path / "app.log")
    assert "no-model-here" in str(failed.value) and "Traceback" in str(failed.value)
