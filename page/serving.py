"""How the page runs on Gradio and on Spaces: library errors shown as page messages, a GPU lent per call on ZeroGPU,
and Gradio's output-image cache made safe for visitors who get the same picture at once.

`app.py` imports this module first: on a ZeroGPU Space `spaces` must be imported before anything starts CUDA.
"""
from __future__ import annotations

import functools
import inspect
import os
import threading
from pathlib import Path

try:
    import spaces
except ImportError:
    spaces = None

import gradio as gr
from gradio import processing_utils


def page_errors(fn):
    """ValueError/RuntimeError from the library become messages on the page and AppErrors for API clients. A
    generator (a handler that streams) stays one, so that Gradio streams it."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streamed(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (ValueError, RuntimeError) as e:
                raise gr.Error(str(e)) from None
        return streamed

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, RuntimeError) as e:
            raise gr.Error(str(e)) from None
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
