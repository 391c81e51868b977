"""`cfgpar serve` as a real process on a free loopback port, with tiny model folders.

Three servers, started once for the module (each start costs seconds of rank start-up):
A: edit model, cfg-parallel-size 2, API key, small limits (most tests; killed ranks; SIGINT last);
B: edit model, cfg-parallel-size 1, short request timeout (parity with A; 504; SIGTERM mid-request);
C: text-to-image model, cfg-parallel-size 1 x ring-degree 2 (generations; idle rank death).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

from cfgpar.testing.tiny_models import write_tiny_qwen_image
from conftest import child_pids

KEY = "test-key-123"
PROMPT = "turn the square into a red circle"
SLOW = {"size": "128x128", "num_inference_steps": "600"}  # seconds on this kind of machine, not minutes
EDIT_SIZE = "32x32"


# ---- model folders and server processes ------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-models")
    edit = write_tiny_qwen_image(root / "tiny-edit", edit=True, vae_scale_factor=8, max_pixels=64 * 28 * 28)
    # The edit pipeline resizes its input to ~1024x1024 by default: 30 s of VAE work per request on
    # a CPU. A small condition area keeps each edit well under a second.
    index = json.loads((edit / "model_index.json").read_text())
    (edit / "model_index.json").write_text(json.dumps({**index, "_cfgpar": {"condition_image_area": 128 * 128}}))
    t2i = write_tiny_qwen_image(root / "tiny-t2i", edit=False, vae_scale_factor=8)
    edit_plus = write_tiny_qwen_image(root / "tiny-edit-plus", edit=True, plus=True, vae_scale_factor=8,
                                      max_pixels=16 * 28 * 28, options={"condition_image_area": 64 * 64})
    return {"edit": edit, "t2i": t2i, "edit_plus": edit_plus}


class Server:
    """One `cfgpar serve` process; its output goes to a log file (a pipe nobody reads would block it)."""

    def __init__(self, name: str, model: Path, log_dir: Path, *args: str):
        self.log = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "cfgpar.cli", "serve", str(model), "--port", "0", "--threads-per-rank", "1",
               "--no-access-log", *args]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = None

    def wait_ready(self, timeout: float = 240) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"ready on (http://\S+)", self.text())
            if match:
                self.url = match[1]
                return self
            assert self.proc.poll() is None, f"server exited ({self.proc.returncode}):\n{self.text()[-3000:]}"
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.text()[-3000:]}")

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not stop within {timeout} s:\n{self.text()[-3000:]}") from None

    # HTTP with the standard library, so that the tests see exactly what goes over the wire.
    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
             key: str | None = KEY, timeout: float = 120):
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        headers = dict(headers or {})
        if key:
            headers["Authorization"] = f"Bearer {key}"
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        try:
            payload = json.loads(data)
        except ValueError:
            payload = data.decode(errors="replace")
        return response.status, payload

    def edit(self, picture: bytes | None, fields: dict, key: str | None = KEY, filename="in.png", timeout=120):
        files = [("image", filename, picture)] if picture is not None else []
        body, ctype = multipart(fields, files)
        return self.call("POST", "/v1/images/edits", body, {"Content-Type": ctype}, key=key, timeout=timeout)

    def generate(self, payload, key: str | None = KEY):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.call("POST", "/v1/images/generations", body, {"Content-Type": "application/json"}, key=key)

    def health(self):
        return self.call("GET", "/health", key=None, timeout=10)

    def metric(self, name: str) -> float:
        """The value of one exact series, e.g. 'cfgpar_images_generated_total'; 0 if absent."""
        status, text = self.call("GET", "/metrics")
        assert status == 200
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_until(self, predicate, timeout: float = 30, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.text()[-3000:]}")

    def wait_busy(self):
        self.wait_until(lambda: self.metric("cfgpar_engine_busy") == 1, what="the engine to start a request")


def multipart(fields: dict, files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, filename, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def start(name, model, tmp_path_factory, *args) -> Server:
    server = Server(name, model, tmp_path_factory.mktemp(f"serve-{name}"), *args)
    try:
        return server.wait_ready()
    except BaseException:
        server.stop(signal.SIGKILL)
        raise


@pytest.fixture(scope="module")
def server_a(models, tmp_path_factory):
    server = start("a", models["edit"], tmp_path_factory, "--cfg-parallel-size", "2", "--api-key", KEY,
                   "--queue-size", "8", "--max-n", "2", "--max-image-pixels", str(200 * 200),
                   "--max-output-pixels", str(128 * 128), "--max-upload-mb", "1", "--default-steps", "2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_b(models, tmp_path_factory):
    server = start("b", models["edit"], tmp_path_factory, "--cfg-parallel-size", "1", "--request-timeout", "3",
                   "--default-steps", "2", "--shutdown-timeout", "0.5")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server_c(models, tmp_path_factory):
    server = start("c", models["t2i"], tmp_path_factory, "--cfg-parallel-size", "1", "--ring-degree", "2", "--default-steps", "2",
                   "--restart-attempts", "1")
    yield server
    server.stop()


# ---- helpers --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def picture() -> bytes:
    y, x = np.mgrid[0:48, 0:64]
    rgb = np.stack([x * 4, y * 5, (x + y) * 2 % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def client(server: Server, key: str | None = KEY):
    import openai

    return openai.OpenAI(api_key=key or "unused", base_url=server.url + "/v1", max_retries=0, timeout=120)


def edit_fields(**overrides) -> dict:
    return {"prompt": PROMPT, "size": EDIT_SIZE, "num_inference_steps": "2", "seed": "1", **overrides}


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run fn in a thread; its result (or exception) lands in the returned dict."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def proc_children(pid: int) -> list[int]:
    """Live (non-zombie) child processes of pid, from /proc."""
    return sorted(child_pids(pid, skip_trackers=False))


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for child in proc_children(todo.pop()):
            found.add(child)
            todo.append(child)
    return found


def rank_pids(server: Server) -> list[int]:
    """The server's rank processes: its multiprocessing-spawned children."""
    ranks = []
    for pid in proc_children(server.proc.pid):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                ranks.append(pid)
        except OSError:
            pass
    return sorted(ranks)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def assert_gone(pids, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "processes left behind"


# ---- the OpenAI client ------------------------------------------------------------------------

@pytest.mark.exactness
@pytest.mark.surface
def test_openai_edit_same_picture_on_1_and_2_ranks_at_same_threads_per_rank(server_a, server_b, picture):
    """The official client gets valid pictures; 2 ranks give the very picture 1 rank gives (both
    servers run one thread per rank)."""
    extra = {"seed": 5, "num_inference_steps": 3, "negative_prompt": "blurry", "true_cfg_scale": 4.0}
    results = {}
    for name, server in (("a", server_a), ("b", server_b)):
        response = client(server).images.edit(image=("in.png", picture, "image/png"), prompt=PROMPT, size="48x32",
                                              n=2, extra_body=extra)
        assert len(response.data) == 2 and response.created > 0
        results[name] = [pixels(d.b64_json) for d in response.data]
        assert results[name][0].shape == (32, 48, 3)
        assert response.model_extra["cfgpar"]["num_branches"] == 2
    for par, seq in zip(results["a"], results["b"], strict=True):
        assert np.array_equal(par, seq)
    # image[] (a list of files) is also accepted
    response = client(server_a).images.edit(image=[("in.png", picture, "image/png")], prompt=PROMPT, size="48x32",
                                            extra_body=extra)
    assert np.array_equal(pixels(response.data[0].b64_json), results["a"][0])


def test_openai_edit_with_several_pictures(models, tmp_path_factory, picture):
    """Qwen-Image-Edit-2509/2511 through the official client: `image` a list of files, as OpenAI's
    images.edit takes them; the server's picture is the offline one (same threads per rank)."""
    import openai

    from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams

    second = png_bytes(40, 56)
    extra = {"seed": 2, "num_inference_steps": 2, "negative_prompt": "blurry", "true_cfg_scale": 4.0}
    files = [("in.png", picture, "image/png"), ("second.png", second, "image/png")]
    server = start("plus", models["edit_plus"], tmp_path_factory, "--cfg-parallel-size", "2", "--default-steps", "2")
    try:
        c = client(server, key=None)
        response = c.images.edit(image=files, prompt=PROMPT, size="32x32", extra_body=extra)
        one = c.images.edit(image=files[:1], prompt=PROMPT, size="32x32", extra_body=extra)
        with pytest.raises(openai.BadRequestError, match="at most 3 picture"):
            c.images.edit(image=files * 2, prompt=PROMPT, size="32x32", extra_body=extra)
    finally:
        server.stop()
    served = pixels(response.data[0].b64_json)
    assert response.model_extra["cfgpar"]["num_branches"] == 2 and served.shape == (32, 32, 3)
    assert not np.array_equal(pixels(one.data[0].b64_json), served)  # the second picture counts
    with Omni(str(models["edit_plus"]), DiffusionParallelConfig(cfg_parallel_size=1), threads_per_rank=1,
              progress_bar=False) as omni:
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data in (picture, second)]
        (out,) = omni.generate({"prompt": PROMPT, "negative_prompt": "blurry", "multi_modal_data": {"image": images}},
                               OmniDiffusionSamplingParams(seed=2, num_inference_steps=2, true_cfg_scale=4.0,
                                                           height=32, width=32))
    assert np.array_equal(np.asarray(out.images[0]), served)


def test_openai_generate(server_c, picture):
    import openai

    response = client(server_c).images.generate(prompt="a blue square", size="48x32", n=2, response_format="b64_json",
                                                extra_body={"seed": 3, "num_inference_steps": 2})
    assert [pixels(d.b64_json).shape for d in response.data] == [(32, 48, 3)] * 2
    again = client(server_c).images.generate(prompt="a blue square", size="48x32", extra_body={"seed": 3,
                                             "num_inference_steps": 2})
    assert np.array_equal(pixels(again.data[0].b64_json), pixels(response.data[0].b64_json))
    assert client(server_c).models.list().data[0].layout == "2 ranks: ring 2"
    with pytest.raises(openai.BadRequestError, match="text-to-image model.*generations"):
        client(server_c).images.edit(image=("in.png", picture, "image/png"), prompt=PROMPT)


def test_models_health_metrics_and_page(server_a):
    status, models = server_a.call("GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "tiny-edit" and models["data"][0]["task"] == "edit"
    status, health = server_a.health()
    assert status == 200 and health["status"] == "ok" and len(health["rank_pids"]) == 2
    status, page = server_a.call("GET", "/", key=None)
    assert status == 200 and "<form" in page and "/v1/images/edits" in page
    status, text = server_a.call("GET", "/metrics")
    assert status == 200
    for series in ('cfgpar_http_requests_total{endpoint="/v1/images/edits",method="POST",status="200"}',
                   'cfgpar_http_request_duration_seconds_bucket{endpoint="/v1/images/edits",le="+Inf"}',
                   "cfgpar_queue_depth 0.0", 'cfgpar_stage_seconds_count{stage="denoise"}',
                   'cfgpar_stage_seconds_count{stage="queue_wait"}', "cfgpar_engine_up 1.0"):
        assert series in text, series


def test_api_key(server_a, picture):
    import openai

    for key in (None, "wrong"):
        assert server_a.call("GET", "/v1/models", key=key)[0] == 401
        assert server_a.call("GET", "/metrics", key=key)[0] == 401
        assert server_a.generate({"prompt": "x"}, key=key)[0] == 401
        status, body = server_a.edit(picture, edit_fields(), key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert server_a.health()[0] == 200
    with pytest.raises(openai.AuthenticationError):
        client(server_a, key="wrong").images.edit(image=("in.png", picture, "image/png"), prompt=PROMPT)


# ---- bad input ------------------------------------------------------------------------------

EDIT_CASES = [
    # (fields, file: "picture" | bytes | None, status, message fragment)
    ({"size": EDIT_SIZE}, "picture", 400, "prompt is required"),
    ({"prompt": "  "}, "picture", 400, "prompt must not be empty"),
    ({"prompt": PROMPT}, None, 400, "image is required"),
    ({"prompt": PROMPT}, b"this is not a picture", 400, "not a picture"),
    ({"prompt": PROMPT}, "big", 400, "over this server's limit of 40000"),
    (edit_fields(size="33x32"), "picture", 400, "multiples of 16"),
    (edit_fields(size="256x256"), "picture", 400, "over this server's limit"),
    (edit_fields(size="large"), "picture", 400, "WIDTHxHEIGHT"),
    (edit_fields(num_inference_steps="0"), "picture", 400, "num_inference_steps must be between 1 and 1000"),
    (edit_fields(num_inference_steps="5000"), "picture", 400, "num_inference_steps must be between 1 and 1000"),
    (edit_fields(num_inference_steps="many"), "picture", 400, "num_inference_steps"),
    (edit_fields(true_cfg_scale="101"), "picture", 400, "true_cfg_scale must be between 0.0 and 100.0"),
    (edit_fields(true_cfg_scale="-1"), "picture", 400, "true_cfg_scale"),
    (edit_fields(image_guidance_scale="1e9"), "picture", 400, "image_guidance_scale"),
    (edit_fields(seed="-3"), "picture", 400, "seed must be between"),
    (edit_fields(n="3"), "picture", 400, "n must be between 1 and 2"),
    (edit_fields(n="0"), "picture", 400, "n must be between 1 and 2"),
    (edit_fields(model="dall-e-3"), "picture", 404, "not served here"),
    (edit_fields(response_format="url"), "picture", 400, "b64_json"),
    (edit_fields(output_format="tiff"), "picture", 400, "output_format"),
    (edit_fields(guidance="7"), "picture", 400, "unknown parameter 'guidance'"),
    ({"prompt": PROMPT}, b"\x89PNG" + b"\0" * (2 * 2**20), 413, "over this server's limit of 1 MiB"),
]


def test_bad_input_gets_4xx_and_server_goes_on(server_a, picture):
    big = png_bytes(256, 256)
    for fields, upload, status, fragment in EDIT_CASES:
        data = {"picture": picture, "big": big}.get(upload, upload) if isinstance(upload, str) else upload
        got, body = server_a.edit(data, fields)
        assert got == status, (fields, body)
        assert fragment in body["error"]["message"], (fields, body)
        assert set(body["error"]) == {"message", "type", "param", "code"}
    # JSON endpoints and odd bodies
    assert "image-edit model" in server_a.generate({"prompt": "x"})[1]["error"]["message"]
    status, body = server_a.call("POST", "/v1/images/edits", b'{"prompt": "x"}', {"Content-Type": "application/json"})
    assert status == 400 and "multipart/form-data" in body["error"]["message"]
    assert server_a.call("GET", "/v1/nothing")[0] == 404
    assert server_a.call("DELETE", "/v1/models")[0] == 405
    # still serving, and nothing above reached the engine
    status, body = server_a.edit(picture, edit_fields())
    assert status == 200 and pixels(body["data"][0]["b64_json"]).shape == (32, 32, 3)
    assert server_a.health()[0] == 200


GENERATION_CASES = [
    (b'{"prompt": "a red', 400, "not valid JSON"),
    (b'["a list"]', 400, "must be a JSON object"),
    (b"", 400, "not valid JSON"),
    ({"size": "32x32"}, 400, "prompt is required"),
    ({"prompt": 42}, 400, "prompt: Input should be a valid string"),
    ({"prompt": "x", "n": 1.5}, 400, "n:"),
    ({"prompt": "x", "size": "20x32"}, 400, "multiples of 16"),
    ({"prompt": "x", "num_inference_steps": 1001}, 400, "num_inference_steps must be between 1 and 1000"),
    ({"prompt": "x", "true_cfg_scale": 1e6}, 400, "true_cfg_scale must be between"),
    ({"prompt": "x", "model": "gpt-image-1"}, 404, "not served here"),
    ({"prompt": "x", "n": 99}, 400, "n must be between 1 and 4"),
    ({"prompt": "x", "stream": True}, 400, "stream is not supported"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested too deeply"),
    ({"prompt": "x", "size": "99999999999999999999x8"}, 400, "over this server's limit"),
    # a parameter this model's family does not take: refused before it is queued (registry.check_request)
    ({"prompt": "x", "size": "32x32", "image_guidance_scale": 2.0}, 400,
     "image_guidance_scale applies to Bagel"),
]


def test_bad_generation_requests(server_c):
    for payload, status, fragment in GENERATION_CASES:
        got, body = server_c.generate(payload)
        assert got == status and fragment in body["error"]["message"], (payload, body)
    status, body = server_c.generate({"prompt": "a green square", "size": "32x32", "seed": 1})
    assert status == 200 and len(body["data"]) == 1
    assert server_c.health()[0] == 200


# ---- load -------------------------------------------------------------------------------------

def test_eight_concurrent_requests_all_complete_and_correct(server_a, picture):
    seeds = list(range(8))
    threads = [in_thread(server_a.edit, picture, edit_fields(seed=str(s), prompt=f"{PROMPT} {s}")) for s in seeds]
    for thread, _ in threads:
        thread.join(120)
    concurrent = []
    for _, box in threads:
        assert "error" not in box, box
        status, body = box["result"]
        assert status == 200, body
        concurrent.append(pixels(body["data"][0]["b64_json"]))
    # each answer is its own request's picture: the same as asked one at a time
    for seed, picture_seen in zip(seeds, concurrent, strict=True):
        status, body = server_a.edit(picture, edit_fields(seed=str(seed), prompt=f"{PROMPT} {seed}"))
        assert status == 200 and np.array_equal(pixels(body["data"][0]["b64_json"]), picture_seen), seed
    assert len({p.tobytes() for p in concurrent}) == len(seeds)


def test_queue_full_gives_429_at_once(server_a, picture):
    slow, slow_box = in_thread(server_a.edit, picture, edit_fields(**SLOW))
    server_a.wait_busy()
    queued = [in_thread(server_a.edit, picture, edit_fields(seed=str(i))) for i in range(8)]
    server_a.wait_until(lambda: server_a.health()[1]["queue_depth"] == 8, what="8 queued requests")
    start = time.monotonic()
    status, body = server_a.edit(picture, edit_fields())
    assert status == 429 and body["error"]["code"] == "queue_full"
    assert time.monotonic() - start < 2
    for thread, box in [(slow, slow_box), *queued]:
        thread.join(120)
        assert box["result"][0] == 200, box
    assert server_a.health()[1]["queue_depth"] == 0


def test_client_that_leaves_while_queued_costs_no_generation(server_a, picture):
    images_before = server_a.metric("cfgpar_images_generated_total")
    dropped = 'cfgpar_requests_dropped_total{reason="client_disconnected"}'
    dropped_before = server_a.metric(dropped)
    slow, slow_box = in_thread(server_a.edit, picture, edit_fields(**SLOW))
    server_a.wait_busy()
    body, ctype = multipart(edit_fields(seed="77"), [("image", "in.png", picture)])
    host, port = urlsplit(server_a.url).hostname, urlsplit(server_a.url).port
    with socket.create_connection((host, port)) as sock:
        sock.sendall(f"POST /v1/images/edits HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        server_a.wait_until(lambda: server_a.health()[1]["queue_depth"] == 1, what="the request to be queued")
    # the client is gone: its request leaves the queue at once, while the slow one still runs
    server_a.wait_until(lambda: server_a.health()[1]["queue_depth"] == 0, timeout=5, what="the queue to empty")
    assert slow.is_alive()
    slow.join(120)
    assert slow_box["result"][0] == 200
    assert server_a.metric(dropped) == dropped_before + 1
    assert server_a.metric("cfgpar_images_generated_total") == images_before + 1


def test_request_timeout_gives_504(server_b, picture):
    start = time.monotonic()
    status, body = server_b.edit(picture, edit_fields(num_inference_steps="1000", size="128x128"))
    assert status == 504 and body["error"]["type"] == "timeout_error"
    assert 2.5 < time.monotonic() - start < 10
    # the server goes on (the abandoned generation finishes first)
    server_b.wait_until(lambda: server_b.metric("cfgpar_engine_busy") == 0, what="the abandoned generation")
    assert server_b.edit(picture, edit_fields())[0] == 200


# ---- failures -------------------------------------------------------------------------------

def test_page_edits_a_picture(server_a, picture, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless browser missing: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--disable-sync", "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    (tmp_path / "in.png").write_bytes(picture)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(
        executable_path=driver, log_output=str(tmp_path / "chromedriver.log")))
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(server_a.url + "/")
        wait.until(lambda b: "API key" in b.find_element(By.ID, "info").text)  # 401 until the key is given
        browser.find_element(By.ID, "apikey").send_keys(KEY + Keys.TAB)
        wait.until(lambda b: "cfg-parallel-size 2" in b.find_element(By.ID, "info").text)
        assert browser.find_element(By.ID, "run").text == "Edit"
        browser.find_element(By.ID, "image").send_keys(str(tmp_path / "in.png"))
        browser.find_element(By.ID, "prompt").send_keys(PROMPT)
        for field, value in (("steps", "2"), ("seed", "1"), ("size", EDIT_SIZE)):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "run").click()
        wait.until(lambda b: "done in" in b.find_element(By.ID, "status").text or b.find_element(By.ID, "error").text)
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert browser.find_element(By.ID, "error").text == ""
        assert re.search(r"done in \d+\.\d\d s", browser.find_element(By.ID, "status").text)
        assert browser.find_element(By.ID, "original").get_attribute("src").startswith("blob:")
        shown = browser.find_element(By.ID, "result").get_attribute("src")
        assert shown.startswith("data:image/png;base64,")
        assert browser.execute_script("return document.getElementById('result').naturalWidth") == 32
        # a request that fails clears the last result: an old picture under the error would read as its own
        browser.find_element(By.ID, "size").clear()
        browser.find_element(By.ID, "size").send_keys("33x32")
        browser.find_element(By.ID, "run").click()
        wait.until(lambda b: "multiples of 16" in b.find_element(By.ID, "error").text)
        assert browser.find_element(By.ID, "result").get_attribute("src") in (None, "")
    finally:
        browser.quit()
    # the page sent what the form said: the same picture as the API gives for those fields
    status, body = server_a.edit(picture, edit_fields(negative_prompt="low quality, blurry", true_cfg_scale="4"))
    assert status == 200 and np.array_equal(pixels(shown.split(",", 1)[1]), pixels(body["data"][0]["b64_json"]))


def test_killed_rank_fails_request_and_server_recovers(server_a, picture):
    old_ranks = rank_pids(server_a)
    assert len(old_ranks) == 2
    slow, slow_box = in_thread(server_a.edit, picture, edit_fields(num_inference_steps="1000", size="128x128"))
    server_a.wait_busy()
    queued, queued_box = in_thread(server_a.edit, picture, edit_fields(seed="9"))
    server_a.wait_until(lambda: server_a.health()[1]["queue_depth"] == 1, what="a queued request")
    os.kill(old_ranks[1], signal.SIGKILL)
    slow.join(30)
    status, body = slow_box["result"]
    # the engine may see rank 1's death, or rank 0's collective failing because of it, first
    assert status == 500 and body["error"]["code"] == "engine_failed", body
    assert server_a.health()[0] == 503  # restarting: the ranks take seconds to start
    server_a.wait_until(lambda: server_a.health()[0] == 200, timeout=180, what="/health back to 200")
    new_ranks = rank_pids(server_a)
    assert len(new_ranks) == 2 and not set(new_ranks) & set(old_ranks)
    assert not [p for p in old_ranks if alive(p)]
    # the request that waited in the queue was not lost, and new ones are served
    queued.join(60)
    assert queued_box["result"][0] == 200
    assert server_a.edit(picture, edit_fields())[0] == 200
    assert server_a.health()[1]["restarts"] == 1 and server_a.metric("cfgpar_engine_restarts_total") == 1
    assert "restarting the ranks" in server_a.text()


def test_idle_rank_death_and_failed_restart_are_reported(server_c, models):
    """A rank that dies while no request runs is noticed; when the ranks cannot be started again,
    /health says so and requests get 503 at once instead of hanging. (Breaks server C's model.)"""
    (models["t2i"] / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    os.kill(rank_pids(server_c)[0], signal.SIGKILL)
    server_c.wait_until(lambda: server_c.health()[1]["status"] == "failed", timeout=120, what="state 'failed'")
    status, health = server_c.health()
    assert status == 503 and "could not be started" in health["detail"]
    start = time.monotonic()
    status, body = server_c.generate({"prompt": "x", "size": "32x32"})
    assert status == 503 and "cannot take requests" in body["error"]["message"] and time.monotonic() - start < 2
    assert "died (exit code -9) while idle" in server_c.text() and "giving up" in server_c.text()
    assert len(rank_pids(server_c)) == 0


def test_server_exits_when_ranks_cannot_start(models, tmp_path):
    broken = shutil.copytree(models["edit"], tmp_path / "broken")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    server = Server("broken", broken, tmp_path)
    assert server.proc.wait(180) == 1
    assert "could not be started" in server.text() and "exiting" in server.text()
    assert not rank_pids(server)


# ---- shutdown (last: these stop the servers) -------------------------------------------------

def test_sigterm_mid_request_answers_and_leaves_nothing(server_b, picture):
    family = descendants(server_b.proc.pid)
    slow, slow_box = in_thread(server_b.edit, picture, edit_fields(num_inference_steps="1000", size="128x128"))
    server_b.wait_busy()
    assert server_b.stop(signal.SIGTERM, timeout=60) == 0
    slow.join(10)
    assert not slow.is_alive() and slow_box["result"][0] == 503  # stopped after --shutdown-timeout
    assert_gone(family)
    assert "stopped" in server_b.text()


def test_sigint_leaves_no_process(server_a):
    family = descendants(server_a.proc.pid)
    assert len([p for p in family if p in rank_pids(server_a)]) == 2
    assert server_a.stop(signal.SIGINT, timeout=60) == 0
    assert_gone(family)


def test_cli_refuses_a_missing_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cfgpar.cli", "serve", str(tmp_path / "nothing"), "--port", "0"],
                            check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no such folder" in result.stderr
