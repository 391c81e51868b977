"""OpenAI's Videos API on `cfgpar serve` (real processes on free loopback ports, tiny Wan models),
and the video store on its own.

Two servers, started together once for the module (their ranks start in parallel):
T: text-to-video, cfg-parallel-size 2, queue size 1 (most tests; 429; delete while queued/running);
I: image-to-video, cfg-parallel-size 1 (input_reference as an upload and as a data URL).
"""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import threading
import time

import numpy as np
import pytest
from PIL import Image
from test_server import Server

from cfgpar.inputs.data import OmniDiffusionSamplingParams
from cfgpar.outputs import OmniRequestOutput
from cfgpar.request import StageMetrics
from cfgpar.server.engine_thread import Job
from cfgpar.server.errors import ServeError
from cfgpar.server.metrics import Metrics
from cfgpar.server.video_store import VideoRecord, VideoStore
from cfgpar.server.videos import nearest_allowed
from cfgpar.testing.tiny_wan import write_tiny_wan
from cfgpar.video_io import mp4_bytes, read_mp4

# openai 3.x warns on every videos.* call that OpenAI's own video service is being retired.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

QUICK = {"num_frames": 9, "num_inference_steps": 3, "seed": 1, "negative_prompt": "blurry"}
SLOW = {"num_frames": 17, "num_inference_steps": 100, "seed": 2}  # ~4 s at 128x128 on 2 cores
TTL = 600


# ---- servers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("video-models")
    return {"t2v": write_tiny_wan(root / "tiny-wan", kind="t2v"), "i2v": write_tiny_wan(root / "tiny-i2v", kind="i2v")}


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve-video")
    started = [
        Server("t", models["t2v"], logs, "--cfg-parallel-size", "2", "--queue-size", "1", "--default-steps", "3",
               "--max-video-frames", "33", "--video-ttl", str(TTL), "--max-stored-videos", "4",
               "--shutdown-timeout", "0.5"),
        Server("i", models["i2v"], logs, "--cfg-parallel-size", "1", "--default-steps", "2", "--shutdown-timeout", "0.5"),
    ]
    try:
        for server in started:
            server.wait_ready()
        yield {"t": started[0], "i": started[1]}
    finally:
        stop_all(started)


def stop_all(servers: list[Server], timeout: float = 60) -> None:
    """SIGTERM to every server at once (each takes seconds to stop its ranks), then wait for each."""
    for server in servers:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM if server.url else signal.SIGKILL)
    codes = {}
    for server in servers:
        try:
            codes[server.log.name] = server.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
            codes[server.log.name] = f"killed: did not stop within {timeout} s"
    assert all(code in (0, -signal.SIGKILL) for code in codes.values()), codes


@pytest.fixture(scope="module")
def t2v(servers) -> Server:
    return servers["t"]


@pytest.fixture(scope="module")
def i2v(servers) -> Server:
    return servers["i"]


def client(server: Server):
    import openai

    return openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0, timeout=60)


def wait_done(server: Server, video_id: str, timeout: float = 60) -> tuple[object, list[int]]:
    """Poll until completed or failed; the final Video and the progress values seen on the way."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = client(server).videos.retrieve(video_id)
        seen.append(video.progress)
        if video.status in ("completed", "failed"):
            return video, seen
        time.sleep(0.05)
    raise AssertionError(f"{video_id} not done after {timeout} s:\n{server.text()[-3000:]}")


def post_json(server: Server, payload) -> tuple[int, object]:
    return server.call("POST", "/v1/videos", json.dumps(payload).encode(), {"Content-Type": "application/json"})


def png(color=(200, 40, 30), size=(64, 64)) -> bytes:
    y, x = np.mgrid[0:size[1], 0:size[0]]
    rgb = np.stack([x * 4 % 256, y * 3 % 256, np.full_like(x, color[2])], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- the openai client, end to end --------------------------------------------------------------

def test_openai_client_create_poll_download_delete(t2v):
    import openai

    c = client(t2v)
    before = {name: t2v.metric(name) for name in ("cfgpar_videos_generated_total",
                                                  'cfgpar_stage_seconds_count{stage="mp4_encode"}')}
    video = c.videos.create(model="tiny-wan", prompt="a red car", seconds="4", size="64x64",
                            extra_body={**QUICK, "fps": 8})
    assert video.status == "queued" and video.progress == 0 and video.id.startswith("video_")
    # num_frames wins over seconds (as in vLLM-Omni); `seconds` then tells the clip's length: 9 frames at 8 fps
    assert (video.size, video.seconds, video.completed_at, video.error) == ("64x64", "1.12", None, None)
    video, seen = wait_done(t2v, video.id)
    assert video.status == "completed" and video.progress == 100 and seen == sorted(seen)
    assert video.expires_at - video.completed_at == TTL and video.completed_at >= video.created_at
    assert video.model_extra["cfgpar"]["num_frames"] == 9 and video.model_extra["cfgpar"]["seed"] == 1
    frames, fps = read_mp4(c.videos.download_content(video.id).read())
    assert len(frames) == 9 and frames[0].size == (64, 64) and fps == 8
    assert c.videos.list().data[0].id == video.id  # newest first
    assert c.videos.delete(video.id).deleted
    with pytest.raises(openai.NotFoundError, match="was deleted"):
        c.videos.retrieve(video.id)
    with pytest.raises(openai.NotFoundError):
        c.videos.download_content(video.id)
    with pytest.raises(openai.NotFoundError):
        c.videos.delete(video.id)
    assert {name: t2v.metric(name) - value for name, value in before.items()} == dict.fromkeys(before, 1)
    text = t2v.call("GET", "/metrics")[1]
    for series in ('cfgpar_http_requests_total{endpoint="/v1/videos/{video_id}/content",method="GET",status="200"}',
                   'cfgpar_video_jobs{status="queued"} 0.0', "cfgpar_video_store_bytes "):
        assert series in text, series


def test_server_video_equals_offline_omni(t2v, models):
    """The server's MP4 holds exactly the frames Omni makes offline for the same request.

    MP4 is lossy, so decoded frames cannot be compared pixel for pixel; but the encoder is
    deterministic (the same frames at the same fps give the same bytes), so the server's bytes
    equal mp4_bytes(offline frames) only if the server generated the very same frames. Offline
    runs on one rank: Wan gives the same frames, bit for bit, at cfg-parallel-size 1 and 2 for
    the same threads per rank. Two identical jobs also give identical bytes."""
    from cfgpar import Omni
    from cfgpar.diffusion.data import DiffusionParallelConfig

    request = {**QUICK, "seed": 7, "guidance_scale": 4.0}
    served = []
    for _ in range(2):
        video = client(t2v).videos.create(prompt="a red car", size="64x64", extra_body=request)
        assert wait_done(t2v, video.id)[0].status == "completed"
        served.append(client(t2v).videos.download_content(video.id).read())
    assert served[0] == served[1]
    with Omni(models["t2v"], DiffusionParallelConfig(cfg_parallel_size=1), threads_per_rank=1,
              progress_bar=False) as omni:
        (out,) = omni.generate({"prompt": "a red car", "negative_prompt": "blurry"}, OmniDiffusionSamplingParams(
            num_inference_steps=3, seed=7, guidance_scale=4.0, height=64, width=64, num_frames=9))
    assert mp4_bytes(out.videos[0], out.fps) == served[0]
    decoded, fps = read_mp4(served[0])
    assert fps == out.fps == 16
    error = np.abs(np.stack(decoded).astype(int) - np.stack(out.videos[0]).astype(int))
    assert error.mean() < 4  # H.264 at crf 18: a few levels


def test_queue_full_429_delete_queued_and_running(t2v):
    """Queue size 1: one job runs, one waits, the next gets 429. Deleting the waiting one frees its
    slot at once; deleting the running one forgets it at once while the engine finishes it."""
    import openai

    c = client(t2v)
    generated = t2v.metric("cfgpar_videos_generated_total")
    dropped = t2v.metric('cfgpar_requests_dropped_total{reason="deleted"}')
    slow = c.videos.create(prompt="a slow boat", size="128x128", extra_body=SLOW)
    seen, deadline = [], time.monotonic() + 60
    while (video := c.videos.retrieve(slow.id)).progress < 10:  # running, no longer queued
        assert video.status in ("queued", "in_progress") and time.monotonic() < deadline, video
        seen.append(video.progress)
        time.sleep(0.05)
    assert video.status == "in_progress"
    with pytest.raises(openai.ConflictError, match="download it once"):
        c.videos.download_content(slow.id)
    queued = c.videos.create(prompt="a cat", size="64x64", extra_body=QUICK)
    assert c.videos.retrieve(queued.id).status == "queued"
    held, start = len(c.videos.list().data), time.monotonic()
    with pytest.raises(openai.RateLimitError) as refused:
        c.videos.create(prompt="one too many", size="64x64", extra_body=QUICK)
    assert refused.value.body["code"] == "queue_full" and time.monotonic() - start < 2
    assert len(c.videos.list().data) == held  # the refused job left nothing behind
    c.videos.delete(queued.id)
    assert t2v.health()[1]["queue_depth"] == 0
    assert t2v.metric('cfgpar_requests_dropped_total{reason="deleted"}') == dropped + 1
    after = c.videos.create(prompt="a dog", size="64x64", extra_body=QUICK)  # the slot is free again
    seen += [c.videos.retrieve(slow.id).progress for _ in range(3)]
    assert seen == sorted(seen) and 0 < seen[-1] < 100
    c.videos.delete(slow.id)  # running: forgotten now, finished by the engine
    with pytest.raises(openai.NotFoundError):
        c.videos.retrieve(slow.id)
    assert wait_done(t2v, after.id)[0].status == "completed"
    assert t2v.metric("cfgpar_videos_generated_total") == generated + 2  # slow's frames made, then dropped
    assert c.videos.list().data[0].id == after.id
    assert slow.id not in [v.id for v in c.videos.list().data]
    c.videos.delete(after.id)


# ---- bad input --------------------------------------------------------------------------------------

BASE = {"prompt": "x", "size": "64x64", "num_frames": 9}
BAD = [
    # (changes to BASE, None removing a field; status; message fragment). JSON and multipart share one validation.
    ({"num_frames": 10}, 400, "4k + 1 for this model; got 10, the nearest allowed are 9 and 13"),
    ({"size": "65x64"}, 400, "multiples of 16"),
    ({"size": "large"}, 400, "WIDTHxHEIGHT"),
    ({"width": 32}, 400, "disagree"),
    ({"size": None, "width": 40}, 400, "multiples of 16"),
    ({"seconds": "2.5"}, 400, "whole number of seconds"),
    ({"seconds": 0}, 400, "whole number of seconds"),
    ({"num_frames": None, "seconds": 4}, 400, "4 s at 16 fps is 65 frames, over this server's limit of 33"),
    ({"num_frames": None}, 400, "num_frames 81, over this server's limit of 33"),  # the model's default
    ({"num_frames": 37}, 400, "num_frames 37, over this server's limit of 33"),
    ({"fps": 0}, 400, "fps must be between 1 and 120"),
    ({"num_inference_steps": 0}, 400, "num_inference_steps must be between"),
    ({"guidance_scale": 1e9}, 400, "guidance_scale must be between"),
    ({"guidance_scale_2": 3.0}, 400, "two-expert models"),
    ({"seed": -1}, 400, "seed must be between"),
    ({"flow_shift": 0}, 400, "flow_shift must be between 0.1 and 100"),
    ({"true_cfg_scale": 4.0}, 400, "take guidance_scale"),
    ({"guidance": 4.0}, 400, "unknown parameter 'guidance'"),
    ({"model": "sora-2"}, 404, "not served here"),
    ({"prompt": " "}, 400, "prompt must not be empty"),
    ({"prompt": None}, 400, "prompt is required"),
    ({"input_reference": {"image_url": "data:image/png;base64,AAAA"}}, 400, "text-to-video model"),
]


def payload(changes: dict) -> dict:
    merged = {**BASE, **changes}
    return {key: value for key, value in merged.items() if value is not None}


def test_bad_requests_refused_before_queueing(t2v):
    import openai

    generated = t2v.metric("cfgpar_videos_generated_total")
    for changes, status, fragment in BAD:
        got, body = post_json(t2v, payload(changes))
        assert got == status and fragment in body["error"]["message"], (changes, body)
    status, body = post_json(t2v, ["a list"])
    assert status == 400 and "must be a JSON object" in body["error"]["message"]
    # the same rules through the official client (multipart)
    with pytest.raises(openai.BadRequestError, match="the nearest allowed are 9 and 13"):
        client(t2v).videos.create(prompt="x", size="64x64", extra_body={"num_frames": 10})
    with pytest.raises(openai.BadRequestError, match="takes no input_reference"):
        client(t2v).videos.create(prompt="x", size="64x64", input_reference=("a.png", png(), "image/png"),
                                  extra_body=QUICK)
    status, body = t2v.call("POST", "/v1/videos", b"prompt x", {"Content-Type": "text/plain"})
    assert status == 400 and "multipart/form-data" in body["error"]["message"]
    # the other routes
    assert t2v.call("GET", "/v1/videos/video_nothing")[0] == 404
    assert t2v.call("GET", "/v1/videos/video_nothing/content")[0] == 404
    assert t2v.call("DELETE", "/v1/videos/video_nothing")[0] == 404
    assert t2v.call("GET", "/v1/videos?limit=0")[0] == 400
    assert t2v.call("GET", "/v1/videos?after=video_nothing")[0] == 400
    # images on a video model
    status, body = t2v.generate({"prompt": "x"})
    assert status == 400 and "makes videos; use POST /v1/videos" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="makes videos"):
        client(t2v).images.edit(image=("a.png", png(), "image/png"), prompt="x")
    assert t2v.metric("cfgpar_videos_generated_total") == generated and t2v.health()[0] == 200


def test_json_seconds_variant_models_and_page(t2v):
    status, video = post_json(t2v, {"prompt": "a boat", "seconds": "1", "fps": 8, "width": 64, "height": 32})
    assert status == 200 and video["seconds"] == "1" and video["size"] == "64x32"
    assert video["cfgpar"]["num_frames"] == 9  # 1 s x 8 fps = 8 -> the nearest 4k + 1
    done, _ = wait_done(t2v, video["id"])
    assert done.status == "completed"
    status, body = t2v.call("GET", f"/v1/videos/{video['id']}/content?variant=thumbnail")
    assert status == 400 and "variant=video" in body["error"]["message"]
    status, data = t2v.call("GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and isinstance(data, str)  # the MP4, not JSON
    status, models = t2v.call("GET", "/v1/models")
    model = models["data"][0]
    assert (model["task"], model["output"], model["frame_unit"], model["max_video_frames"]) == (
        "text-to-video", "video", 4, 33)
    status, page = t2v.call("GET", "/")
    assert status == 200 and "/v1/videos" in page
    assert t2v.health()[1]["status"] == "ok"


# ---- image to video --------------------------------------------------------------------------------

def test_image_to_video_upload_and_data_url(i2v):
    """The first frame as a multipart upload (the openai client) or a JSON data URL: the same job."""
    import openai

    picture = png()
    extra = {"num_frames": 5, "num_inference_steps": 2, "seed": 3}
    c = client(i2v)
    uploaded = c.videos.create(prompt="a cat", size="64x64", input_reference=("first.png", picture, "image/png"),
                               extra_body=extra)
    status, by_url = post_json(i2v, {"prompt": "a cat", "size": "64x64", **extra, "input_reference": {
        "image_url": "data:image/png;base64," + base64.b64encode(picture).decode()}})
    assert status == 200
    contents = []
    for video_id in (uploaded.id, by_url["id"]):
        assert wait_done(i2v, video_id)[0].status == "completed"
        contents.append(c.videos.download_content(video_id).read())
    assert contents[0] == contents[1]
    frames, _ = read_mp4(contents[0])
    assert len(frames) == 5 and frames[0].size == (64, 64)
    with pytest.raises(openai.BadRequestError, match="input_reference is required"):
        c.videos.create(prompt="a cat", size="64x64", extra_body=extra)
    for reference, fragment in (({"image_url": "https://example.com/a.png"}, "fetches no URLs"),
                                ({"file_id": "file_1"}, "file_id is not supported"),
                                ({"image_url": "data:image/png;base64,not base64!"}, "malformed")):
        status, body = post_json(i2v, {"prompt": "x", "size": "64x64", "input_reference": reference})
        assert status == 400 and fragment in body["error"]["message"], body
    with pytest.raises(openai.BadRequestError, match="not a picture"):
        c.videos.create(prompt="a cat", input_reference=("first.png", b"not a picture", "image/png"))
    assert "makes videos" in i2v.generate({"prompt": "x"})[1]["error"]["message"]


def test_video_request_on_an_image_model_names_the_image_endpoint():
    """(No image server here: the check itself, with the facts an image model reports.)"""
    from cfgpar.models.info import ModelInfo
    from cfgpar.server.config import ServerConfig
    from cfgpar.server.requests import served_model

    config = ServerConfig(model_name="tiny-t2i", cfg_parallel_size=1)
    for task, endpoint in (("text-to-image", "/v1/images/generations"), ("edit", "/v1/images/edits")):
        info = ModelInfo(task=task, tasks=(task,), max_branches=2, output_kind="image", size_unit=16)
        worker = type("Worker", (), {"model_info": info})
        with pytest.raises(ServeError, match=f"makes images, not videos; use POST {endpoint}") as refused:
            served_model(config, worker, None, "video")
        assert refused.value.status == 400


# ---- the store and the frame rule on their own (no processes) -------------------------------------------

def test_nearest_allowed_frames():
    assert [nearest_allowed(n, 4) for n in (1, 2, 3, 4, 5, 8, 47, 64, 80, 81)] == [1, 1, 5, 5, 5, 9, 49, 65, 81, 81]
    assert nearest_allowed(37, 1) == 37


def finished_job(store: VideoStore, video_id: str, *, frames: int = 2) -> VideoRecord:
    """A record whose job the engine 'finished' with a small video; waits for its MP4."""
    job = Job({"prompt": "x"}, OmniDiffusionSamplingParams(), deadline=float("inf"))
    record = VideoRecord(id=video_id, model="m", prompt="x", seconds="1", size="16x16", details={}, job=job)
    store.add(record)
    job.future.add_done_callback(lambda future: store.finished(record, future))
    job.future.set_running_or_notify_cancel()
    video = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(frames)]
    job.future.set_result(OmniRequestOutput(request_id=0, prompt="x", videos=[video], fps=4, metrics=StageMetrics()))
    deadline = time.monotonic() + 10
    while store.body(video_id)["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return record


def test_store_keeps_finished_videos_within_ttl_count_and_bytes():
    store = VideoStore(ttl_s=60.0, max_videos=2, max_bytes=10**9, metrics=Metrics())
    try:
        for name in ("a", "b", "c"):
            finished_job(store, name)
        with pytest.raises(ServeError, match="has expired") as gone:  # the oldest of three, over max 2
            store.body("a")
        assert gone.value.status == 404
        assert [body["id"] for body in store.bodies()] == ["b", "c"]
        store.ttl_s = 0.0  # rather than sleeping past the TTL
        assert store.bodies() == []
        store.ttl_s = 60.0
        store.max_bytes = len(store.content(finished_job(store, "d").id)[0]) + 1
        finished_job(store, "e")  # over the byte budget with d: d goes, e (the newest) stays
        assert [body["id"] for body in store.bodies()] == ["e"]
        # a failure is kept like a video, with OpenAI's error object
        job = Job({"prompt": "x"}, OmniDiffusionSamplingParams(), deadline=float("inf"))
        record = VideoRecord(id="f", model="m", prompt="x", seconds="1", size="16x16", details={}, job=job)
        store.add(record)
        store.progress(record, 3, 4)
        assert store.body("f")["progress"] == 75 and store.body("f")["status"] == "queued"
        job.future.add_done_callback(lambda future: store.finished(record, future))
        job.future.set_running_or_notify_cancel()
        job.future.set_exception(ServeError(500, "the engine failed", code="engine_failed"))
        body = store.body("f")
        assert body["status"] == "failed" and body["error"] == {"code": "engine_failed", "message": "the engine failed"}
        assert store.remove("f") is record
        with pytest.raises(ServeError, match="was deleted"):
            store.body("f")
    finally:
        store.close()


def test_store_drops_a_job_deleted_while_running():
    store = VideoStore(ttl_s=60, max_videos=4, max_bytes=10**9, metrics=Metrics())
    try:
        job = Job({"prompt": "x"}, OmniDiffusionSamplingParams(), deadline=float("inf"))
        record = VideoRecord(id="g", model="m", prompt="x", seconds="1", size="16x16", details={}, job=job)
        store.add(record)
        job.future.add_done_callback(lambda future: store.finished(record, future))
        job.future.set_running_or_notify_cancel()
        assert store.body("g")["status"] == "in_progress"
        store.remove("g")
        job.future.set_result(OmniRequestOutput(request_id=0, prompt="x", videos=[[Image.new("RGB", (16, 16))]],
                                                fps=4, metrics=StageMetrics()))
        encoded = threading.Event()
        store._encoder.submit(encoded.set)  # runs after any encoding the result would have queued
        assert encoded.wait(10) and store.bodies() == [] and record.content is None
    finally:
        store.close()
