"""How the page runs on Gradio and on Spaces: library errors shown as page messages, a GPU lent per call on ZeroGPU,
and Gradio's output-image cache made safe for visitors who get the same picture at once.

`app.py` imports this module first: on a ZeroGPU Space `spaces` must be imported before anything starts CUDA.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
from pathlib import Path

try:
    import spaces
except ImportError:
    spaces = None

import gradio as gr
from gradio import processing_utils


log = logging.getLogger("captioner.page")
if not log.handlers:  # one line per refusal on stderr, whatever the host configured (uvicorn configures no root)
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def refusal(message: str) -> gr.Error:
    """An expected refusal (a bad file, a setting out of range): the message for the page or the API caller, and
    one line in the server log instead of Gradio's traceback. Raise what it returns."""
    log.info("refused: %s", message)
    return gr.Error(message, print_exception=False)


def page_errors(fn):
    """ValueError/RuntimeError from the library become messages on the page and AppErrors for API clients, logged
    as one line (`refusal`); any other exception is a bug and keeps Gradio's full traceback in the log. A generator
    (a handler that streams) stays one, so that Gradio streams it."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streamed(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (ValueError, RuntimeError) as e:
                raise refusal(str(e)) from None
        return streamed

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, RuntimeError) as e:
            raise refusal(str(e)) from None
    return wrapped


def on_gpu(fn):
    """On a ZeroGPU Space (the `spaces` package importable), run `fn` under `spaces.GPU`, which lends it a GPU for
    the call; elsewhere `fn` unchanged."""
    return fn if spaces is None else spaces.GPU(fn)


def write_output_images_atomically() -> None:
    """Make Gradio's output-image cache safe for visitors who get the same picture at the same time.

    Gradio 6 stores each output image under a hash of its bytes and rewrites that file in place on every save. When
    two visitors get identical images at once (the same example, say), one visitor's download can be read while the
    other's save has just truncated the file: a broken image ("Too little data for declared Content-Length").
    Here an image whose file exists is not written again (its name is its content), and a new one is written to a
    temporary file and renamed into place, so a reader always sees a whole file. Idempotent.
    """
    if getattr(processing_utils.save_pil_to_cache, "atomic", False):
        return

    def save_pil_to_cache(img, cache_dir: str, name: str = "image", format: str = "webp") -> str:
        data = processing_utils.encode_pil_to_bytes(img, format)
        folder = Path(cache_dir) / processing_utils.hash_bytes(data)
        folder.mkdir(exist_ok=True, parents=True)
        path = (folder / f"{name}.{format}").resolve()
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return str(path)

    save_pil_to_cache.atomic = True
    processing_utils.save_pil_to_cache = save_pil_to_cache


def mcp_tools_return_every_output() -> None:
    """Make Gradio's MCP server return each output of a queued endpoint as its own content item.

    Gradio 6.31 waits for a tool call's result with `job.result()` and wraps it in a list as if the endpoint had one
    output: with several outputs they come back as one string (images included), and an endpoint with a `gr.State`
    output fails with "pop index out of range" (the client's result leaves the state out; Gradio then removes it
    again). Here the call reads the queue's final message, which holds every output, the state's place included,
    just as Gradio's own path for calls with progress reports does. Idempotent."""
    from gradio.mcp import GradioMCPServer

    if getattr(GradioMCPServer._execute_tool_without_progress, "every_output", False):
        return

    async def _execute_tool_without_progress(self, job) -> list:
        async for update in job:
            if update.type == "output" and update.final:
                if not update.success:
                    raise RuntimeError(update.outputs.get("error") or update.outputs.get("title") or "Error!")
                return update.outputs["data"]
        raise job.exception() or RuntimeError("The tool call ended without a result.")

    _execute_tool_without_progress.every_output = True
    GradioMCPServer._execute_tool_without_progress = _execute_tool_without_progress
