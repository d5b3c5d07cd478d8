"""Embedding the app: the API's descriptions and types, the README's Python, JavaScript and plain-HTTP examples run
as written against `python app.py`, the MCP server through the `mcp` client, and a quiet log for refusals.

One `python app.py` (the bundled model, MCP on by default) serves the whole module."""
from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import captioner
import servers  # scripts/servers.py

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "tests" / "js"  # package.json + package-lock.json: `make node` installs @gradio/client there
SCENE = ROOT / "assets" / "examples" / "scene_17.png"
README_URL = "http://127.0.0.1:7860"  # what the examples say, replaced by the test server's URL
INTEGERS = {"max_new_tokens", "num_beams", "top_k", "seed", "head", "word_index"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("embed") / "app.log"
    with servers.app_running({"CAPTIONER_MODEL": captioner.BUNDLED_MODEL, "CAPTIONER_MCP": None}, log=log) as app:
        yield app


@pytest.fixture(scope="module")
def url(server):
    return server.url.rstrip("/")


@pytest.fixture(scope="module")
def client(url):
    return Client(url, analytics_enabled=False, verbose=False)


def examples(kind: str, url: str) -> list[str]:
    """The README's code blocks marked `<!-- run: kind -->`, with the local URL put in for README_URL."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- run: " + kind + r" -->\n```\w+\n(.*?)```", text, flags=re.S)
    assert blocks, f"README.md has no block marked <!-- run: {kind} -->"
    return [b.replace(README_URL, url) for b in blocks]


def run(args: list[str], **kwargs) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=180, **kwargs)
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def check_api(endpoints: dict, javascript: bool = False) -> None:
    """No empty description, no made-up name (parameter_N, value_N), integers typed as integers. The JavaScript
    client's view_api() shows each input's and output's description but drops the endpoints' own and turns
    every type but string, number and boolean into "", so those are checked from Python."""
    assert set(endpoints) == {"/caption", "/explain", "/heatmap", "/locate", "/check"}
    for name, info in endpoints.items():
        assert javascript or len(info["description"]) > 40, name
        for p in info["parameters"]:
            assert not re.match(r"(parameter|param|value)_\d+$", p["parameter_name"]), (name, p)
            assert not re.match(r"(parameter|value)_\d+$", p["label"]), (name, p)
            description = p["description"] if javascript else p["type"].get("description")
            assert description and len(description) > 10, (name, p)
            if p["parameter_name"] in INTEGERS and not javascript:
                assert p["type"]["type"] == "integer", (name, p)
        for r in info["returns"]:
            assert not re.match(r"(parameter|value)_\d+$", r["label"]), (name, r)
            description = r["description"] if javascript else r["type"].get("description")
            assert description and len(description) > 10, (name, r)


def test_every_endpoint_is_described_and_named_and_integers_are_integers(client):
    api = client.view_api(print_info=False, return_format="dict")
    check_api(api["named_endpoints"])
    schema = api["named_endpoints"]["/caption"]["returns"][4]["type"]
    assert {"version", "caption", "words", "word_maps", "model"} <= set(schema["properties"])


def test_the_result_names_its_model_by_an_id_the_api_accepts(client):
    result = client.predict(handle_file(str(SCENE)), api_name="/caption")[4]
    assert result["version"] == 1 and result["model"] == "bundled scene captioner"
    again = client.predict(handle_file(str(SCENE)), model=result["model"], api_name="/caption")[4]
    assert again["caption"] == result["caption"]


def test_the_readme_python_example_runs(url):
    for code in examples("python", url):
        run([sys.executable, "-c", code], cwd=ROOT)


def test_the_readme_javascript_example_runs_and_its_client_sees_a_described_api(url, tmp_path):
    """Node 20 and the pinned @gradio/client (`make node`); never skipped: `make test` installs them."""
    assert (JS / "node_modules" / "@gradio" / "client").is_dir(), "run `make node` (Node 20 and @gradio/client)"
    (tmp_path / "node_modules").symlink_to(JS / "node_modules")  # imports resolve from the script's folder
    for k, code in enumerate(examples("js", url)):
        (tmp_path / f"example{k}.mjs").write_text(code)
        out = run(["node", str(tmp_path / f"example{k}.mjs")], cwd=ROOT)
        box = json.loads(out.split("]")[0] + "]")
        assert len(box) == 4 and box[0] < box[2] and box[1] < box[3], out
    (tmp_path / "api.mjs").write_text('import { Client } from "@gradio/client";\n'
                                      f'const client = await Client.connect("{url}/");\n'
                                      "console.log(JSON.stringify(await client.view_api()));\n"
                                      "process.exit();\n")
    check_api(json.loads(run(["node", str(tmp_path / "api.mjs")], cwd=ROOT))["named_endpoints"], javascript=True)


def test_the_readme_http_example_runs(url):
    for code in examples("sh", url):
        out = json.loads(run(["bash", "-euo", "pipefail", "-c", code], cwd=ROOT))
        assert len(out["box"]) == 4 and 0 <= out["score"] <= 1, out


async def _mcp(url: str, calls: list[tuple[str, dict]]):
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with streamable_http_client(f"{url}/gradio_api/mcp/") as (read, write, _):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = (await session.list_tools()).tools
            return tools, [await session.call_tool(name, args) for name, args in calls]


def test_an_mcp_client_lists_the_tools_and_gets_a_caption_and_a_box(url):
    """Images go in as data: URLs (an upload inline); http(s) URLs work the same way, but Gradio fetches only
    public addresses (its SSRF guard refuses 127.0.0.1), which this machine cannot reach."""
    scene = "data:image/png;base64," + base64.b64encode(SCENE.read_bytes()).decode()
    tools, (captioned, located) = asyncio.run(_mcp(url, [
        ("caption", {"image": scene, "num_beams": 1}),
        ("locate", {"image": scene, "phrase": "green star"}),
    ]))
    by_name = {t.name: t for t in tools}
    assert {"caption", "explain", "locate"} <= set(by_name)
    for name in ("caption", "explain", "locate"):
        assert len(by_name[name].description) > 40 and "image" in by_name[name].inputSchema["properties"]
    assert by_name["caption"].inputSchema["properties"]["num_beams"]["type"] == "integer"
    assert not captioned.isError and not located.isError, (captioned, located)
    texts = [c.text for c in captioned.content if c.type == "text"]
    assert any("star" in t for t in texts) and any(c.type == "image" for c in captioned.content)
    where = next(json.loads(t) for t in (c.text.replace("'", '"') for c in located.content if c.type == "text")
                 if t.startswith("{") and '"box"' in t)
    x0, y0, x1, y1 = where["box"]
    assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96 and any(c.type == "image" for c in located.content)


def test_a_refusal_logs_one_line_and_no_traceback(server, client):
    before = server.log.read_text()
    with pytest.raises(AppError, match="num_beams must be between 1 and 8"):
        client.predict(handle_file(str(SCENE)), num_beams=100, api_name="/caption")
    with pytest.raises(AppError, match="word_index must be between"):
        client.predict(handle_file(str(SCENE)), "a star", 9, api_name="/heatmap")
    new = server.log.read_text()[len(before):]
    assert "Traceback" not in new, new
    refused = [line for line in new.splitlines() if "refused:" in line]
    assert len(refused) == 2 and "num_beams" in refused[0] and "word_index" in refused[1], new


def test_an_unexpected_error_is_not_turned_into_a_refusal():
    from page.serving import page_errors

    @page_errors
    def broken():
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # Gradio then logs it in full
        broken()
