"""Load on `cfgpar serve`: requests per minute and p50/p95 latency at several concurrencies,
with cfg-parallel-size 1 and 2, against a server this script starts (on a free loopback port).

    python benchmarks/serve_load.py [--model FOLDER] [--requests 24] [--concurrency 1 4 16] [--cfg-sizes 1 2]

The model defaults to the embedded edit model if it is there, else a small random-weight
Qwen-Image-Edit-architecture model built once under .cache/bench. Requests are edits (or
generations for a text-to-image model) with true CFG (two branches), one thread per rank
("one core stands for one device", as in benchmarks/cfg_parallel.py). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent


def default_model() -> Path:
    try:
        from cfgpar.models.embedded import default_model as embedded

        return embedded("edit")
    except FileNotFoundError:
        return tiny_model()


def tiny_model() -> Path:
    import json as _json

    from cfgpar.testing.tiny_models import write_tiny_qwen_image

    # Sized like benchmarks/cfg_parallel.py's model: the transformer, which CFG-Parallel splits, dominates.
    folder = ROOT / ".cache" / "bench" / "serve-edit-l8-h8x64-t64"
    if not (folder / "model_index.json").exists():
        write_tiny_qwen_image(folder, edit=True, num_layers=8, num_attention_heads=8, attention_head_dim=64,
                              text_hidden_size=64, vae_scale_factor=8, max_pixels=64 * 28 * 28)
        index = _json.loads((folder / "model_index.json").read_text())
        index["_cfgpar"] = {"condition_image_area": 128 * 128}  # a small input keeps the encode cheap
        (folder / "model_index.json").write_text(_json.dumps(index))
    return folder


def picture() -> bytes:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:96, 0:128]
    buffer = io.BytesIO()
    Image.fromarray(np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class Target:
    """A started server and the request it is sent, over and over."""

    def __init__(self, model: Path, cfg_size: int, args, log: Path):
        cmd = [sys.executable, "-m", "cfgpar.cli", "serve", str(model), "--port", "0", "--cfg-parallel-size",
               str(cfg_size), "--threads-per-rank", str(args.threads_per_rank), "--queue-size", "256",
               "--request-timeout", "3600", "--no-access-log"]
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = self._wait_ready()
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname, parts.port
        task = self.call("GET", "/v1/models")[1]["data"][0]["task"]
        fields = {"prompt": "turn the square into a red circle", "negative_prompt": "low quality, blurry",
                  "true_cfg_scale": 4.0, "num_inference_steps": args.steps, "size": f"{args.size}x{args.size}",
                  "seed": 0}
        if task == "edit":
            self.path, (self.body, ctype) = "/v1/images/edits", _multipart(fields, picture())
        else:
            self.path, self.body, ctype = "/v1/images/generations", json.dumps(fields).encode(), "application/json"
        self.headers = {"Content-Type": ctype}

    def _wait_ready(self, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"ready on (http://\S+)", self.log.read_text(errors="replace"))
            if match:
                return match[1]
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        raise SystemExit("server not ready in time")

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=3600)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def one(self) -> tuple[int, float, float]:
        """(status, latency seen by the client, seconds the engine spent on it)."""
        start = time.perf_counter()
        status, body = self.call("POST", self.path, self.body, self.headers)
        engine_s = body["cfgpar"]["timings"]["generate_s"] if status == 200 else float("nan")
        return status, time.perf_counter() - start, engine_s

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def _multipart(fields: dict, image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="in.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_level(target: Target, concurrency: int, count: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: target.one(), range(count)))
    wall = time.perf_counter() - start
    ok = [(s, engine) for status, s, engine in results if status == 200]
    if not ok:
        return {"rpm": 0.0, "p50": float("nan"), "p95": float("nan"), "engine": float("nan"), "errors": len(results)}
    latencies = [s for s, _ in ok]
    return {"rpm": len(ok) / wall * 60, "p50": statistics.median(latencies), "p95": percentile(latencies, 0.95),
            "engine": statistics.median(e for _, e in ok), "errors": len(results) - len(ok)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: embedded, else a tiny one)")
    parser.add_argument("--requests", type=int, default=24,
                        help="requests per concurrency level, at least the concurrency (default 24)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--cfg-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256, help="output side in px (default 256)")
    parser.add_argument("--threads-per-rank", type=int, default=1)
    args = parser.parse_args()

    model = args.model or default_model()
    log_dir = ROOT / ".cache" / "bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for cfg_size in args.cfg_sizes:
        target = Target(model, cfg_size, args, log_dir / f"serve_load_cfg{cfg_size}.log")
        try:
            for _ in range(2):  # warm-up
                target.one()
            for concurrency in args.concurrency:
                rows.append((cfg_size, concurrency, run_level(target, concurrency, max(args.requests, concurrency))))
                print(f"cfg {cfg_size}, concurrency {concurrency}: done", file=sys.stderr, flush=True)
        finally:
            target.stop()
    print(f"\nmodel {model.name}, {target.path}, {args.size}x{args.size}, {args.steps} steps, true CFG (2 branches), "
          f"{args.threads_per_rank} thread(s) per rank; latency is the client's (queue wait included), "
          f"engine is the generation alone\n")
    print("| cfg-parallel-size | concurrency | requests | requests/min | p50 latency s | p95 latency s "
          "| p50 engine s | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for cfg_size, concurrency, r in rows:
        print(f"| {cfg_size} | {concurrency} | {max(args.requests, concurrency)} | {r['rpm']:.1f} | {r['p50']:.2f} "
              f"| {r['p95']:.2f} | {r['engine']:.2f} | {r['errors']} |")


if __name__ == "__main__":
    main()
