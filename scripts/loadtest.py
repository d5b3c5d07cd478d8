"""Many visitors at once: start the real app (`python app.py`, the bundled model or `--model PATH`) on 127.0.0.1
and let N gradio_client visitors each caption and then explain several example images (scenes for the bundled
model, the example photos for any other), all at the same time, with the page's default map.

    OMP_NUM_THREADS=1 python scripts/loadtest.py --clients 20 --images 3 [--rounds 2]
    python scripts/loadtest.py --model /tmp/full --clients 5 --images 2   # the hub-size architecture

Prints a Markdown table: requests/s, p50/p95 latency, errors (must be 0) and the server's resident memory (idle
before, peak during, idle after each round of visitors), then stops the server. Exits 1 on any error, or when
the deadline passes before every request was sent.
Opt-in: the default test suite runs only a 2-visitor smoke test of it (`pytest -m slow`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from servers import start_app  # scripts/servers.py: a free port without a race

ROOT = Path(__file__).resolve().parent.parent
SCENES = sorted(str(p) for p in (ROOT / "assets" / "examples").glob("scene_*.png"))
PHOTOS = sorted(str(p) for p in (ROOT / "assets" / "examples").glob("*.jpg"))
RESULT = 4  # /caption and /explain return (words, word overlay, CLS overlay, strip, result JSON, info)


def rss_mb(pid: int) -> float:
    """Resident memory of the server and any children it started, in MB."""
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 1e6


class Sampler(threading.Thread):
    """The server's peak RSS, sampled every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()

    def run(self):
        while not self.done.wait(0.05):
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except psutil.Error:
                return


def visitor(url: str, index: int, n_images: int, timeout: float, deadline: float,
            pool: list[str] = SCENES, text: str | None = None) -> list[tuple[str, float, str]]:
    """One visitor: for each of its images (from `pool`), /caption and then /explain of the caption it got (or of
    `text`). -> [(endpoint, seconds, error or "")]."""
    from gradio_client import Client, handle_file

    client = Client(url, analytics_enabled=False, verbose=False)
    calls = []
    for k in range(n_images):
        scene = handle_file(pool[(index + k) % len(pool)])
        caption = None
        for api_name in ("/caption", "/explain"):
            if time.monotonic() > deadline:
                calls.append((api_name, 0.0, "deadline passed before the request"))
                continue
            args = (scene,) if api_name == "/caption" else (scene, text or caption or "a small red circle")
            start = time.perf_counter()
            try:
                result = client.submit(*args, api_name=api_name).result(timeout=timeout)[RESULT]
                caption = result["caption"] if api_name == "/caption" else caption
                calls.append((api_name, time.perf_counter() - start, "" if result["words"] else "empty caption"))
            except Exception as e:  # a load test counts every failure, whatever it is
                calls.append((api_name, time.perf_counter() - start, f"{type(e).__name__}: {e}"))
    return calls


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=20, help="visitors at once")
    ap.add_argument("--images", type=int, default=3, help="scenes each visitor captions and explains")
    ap.add_argument("--rounds", type=int, default=1, help="times the visitors come, on the same server")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one request may take")
    ap.add_argument("--deadline", type=float, default=600, help="seconds the whole run may take")
    ap.add_argument("--startup", type=float, default=120, help="seconds app.py may take to start serving")
    ap.add_argument("--model", help="model folder the server loads (default: the bundled scene model)")
    ap.add_argument("--text", help="caption each visitor explains (default: the one /caption gave it). For the "
                    "random full-size model: its random vocabulary spells a decoded caption in ~10x more tokens "
                    "than it was generated with, which no real tokenizer does")
    args = ap.parse_args(argv)
    pool = PHOTOS if args.model else SCENES

    # no CAPTIONER_MODEL: the bundled model; no CAPTIONER_EXTRA_MODELS: no other model on the page
    app = start_app({"CAPTIONER_MODEL": args.model, "CAPTIONER_EXTRA_MODELS": None}, args.startup)
    server = app.process
    try:
        url = app.url
        visitor(url, 0, 1, args.timeout, time.monotonic() + args.timeout, pool, args.text)  # warm-up: lazy costs
        idle = [rss_mb(server.pid)]  # after the warm-up, then after each round
        sampler = Sampler(server.pid)
        sampler.start()
        wall, deadline, calls = 0.0, time.monotonic() + args.deadline, []
        for _ in range(args.rounds):  # the same server again: does memory level off or keep growing?
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as executor:
                futures = [executor.submit(visitor, url, i, args.images, args.timeout, deadline, pool, args.text)
                           for i in range(args.clients)]
                calls += [call for f in futures for call in f.result()]
            wall += time.perf_counter() - start
            time.sleep(1)
            idle.append(rss_mb(server.pid))
        sampler.done.set()
        sampler.join()
    finally:
        app.stop()

    ok = [s for _, s, err in calls if not err]
    errors = [(api, err) for api, _, err in calls if err]
    rows = [("all", [s for _, s, err in calls if not err])] + \
        [(api, [s for a, s, err in calls if a == api and not err]) for api in ("/caption", "/explain")]
    model = Path(args.model).name if args.model else "bundled model"
    print(f"\n{args.rounds} x {args.clients} visitors x {args.images} images x (/caption + /explain), {model}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs\n")
    print("| endpoint | requests | errors | requests/s | p50 s | p95 s | max s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, secs in rows:
        n_err = sum(1 for api, _ in errors if name in ("all", api))
        if secs:
            print(f"| {name} | {len(secs) + n_err} | {n_err} | {len(secs) / wall:.2f} | {percentile(secs, 50):.2f} | "
                  f"{percentile(secs, 95):.2f} | {max(secs):.2f} |")
        else:
            print(f"| {name} | {n_err} | {n_err} | 0 | - | - | - |")
    print(f"\nwall {wall:.1f} s · server RSS: idle before {idle[0]:.0f} MB · peak {sampler.peak:.0f} MB · "
          "idle after " + " / ".join(f"round {k + 1} {mb:.0f} MB" for k, mb in enumerate(idle[1:])))
    for api, err in errors[:10]:
        print(f"error {api}: {err[:300]}")
    if errors:
        print(f"server log: {app.log}")
    else:
        app.log.unlink()
    return 1 if errors or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
