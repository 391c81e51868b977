"""A rank that hangs instead of dying: SIGSTOP (no heartbeat) and a rank stuck in its own work
(heartbeat on, no progress), mid-request and while idle, offline (Omni, the toy pipeline) and in
`cfgpar serve`; and Ctrl-C on `cfgpar edit`. Real processes, real gloo, real signals.

Bounds: the watchdog's limit plus DETECT_MARGIN_S for the engine's poll (0.25 s), the grace
before SIGKILL (2 s) and a loaded 2-core machine; the same margin everywhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.engine.engine import EngineError
from cfgpar.engine.watchdog import WatchdogConfig
from conftest import child_pids
from test_server import Server, alive, assert_gone, edit_fields, in_thread, models, picture  # noqa: F401  (fixtures)

PICTURE = Path(__file__).resolve().parent.parent / "examples" / "assets" / "shapes-input.png"
HEARTBEAT_S = 3.0
DETECT_MARGIN_S = 10.0
WATCHDOG = WatchdogConfig(heartbeat_timeout_s=HEARTBEAT_S, stall_floor_s=2.0, stall_ceiling_s=6.0)


def toy_omni(model) -> Omni:
    return Omni(model, DiffusionParallelConfig(cfg_parallel_size=2), threads_per_rank=1, progress_bar=False,
                watchdog=WATCHDOG)


def params(steps: int) -> OmniDiffusionSamplingParams:
    return OmniDiffusionSamplingParams(num_inference_steps=steps, seed=1)


def stop_after_first_step(pid: int):
    """An on_progress that SIGSTOPs `pid` once rank 0 has reported a step (the request is running)."""
    stopped = threading.Event()

    def on_progress(done, total):
        if not stopped.is_set():
            stopped.set()
            os.kill(pid, signal.SIGSTOP)

    return on_progress, stopped


def test_stopped_rank_mid_request_fails_the_request_naming_it(toy_model):
    omni = toy_omni(toy_model)
    pids = omni.rank_pids
    on_progress, stopped = stop_after_first_step(pids[1])
    try:
        with pytest.raises(EngineError) as failure:
            omni.generate({"prompt": "slow: a", "negative_prompt": "b"}, params(400), on_progress=on_progress)
        assert stopped.is_set(), "the request never reported a step"
        seconds = time.monotonic() - _first_stop[0]
    finally:
        omni.close()
    assert failure.value.cause == "hung" and failure.value.headline.startswith("rank 1 has been silent for")
    assert seconds < HEARTBEAT_S + DETECT_MARGIN_S, seconds
    assert_gone(pids)  # the stopped rank too: SIGKILL reaches a stopped process
    # control: without the stop, the same engine settings run the request to its end
    with toy_omni(toy_model) as omni:
        (out,) = omni.generate({"prompt": "slow: a", "negative_prompt": "b"}, params(4))
    assert len(out.images) == 1


_first_stop: list[float] = []


@pytest.fixture(autouse=True)
def _clock(monkeypatch):
    """Records when a test SIGSTOPs a rank, so that detection time is measured from the stop."""
    real_kill = os.kill

    def kill(pid, sig):
        if sig == signal.SIGSTOP:
            _first_stop[:] = [time.monotonic()]
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    yield
    _first_stop.clear()


def test_stopped_rank_while_idle_is_named_before_any_work(toy_model):
    omni = toy_omni(toy_model)
    pids = omni.rank_pids
    try:
        omni.generate({"prompt": "a", "negative_prompt": "b"}, params(2))
        omni.check()  # all well: no error
        os.kill(pids[0], signal.SIGSTOP)
        deadline = time.monotonic() + HEARTBEAT_S + DETECT_MARGIN_S
        with pytest.raises(EngineError) as failure:
            while time.monotonic() < deadline:
                omni.check()
                time.sleep(0.2)
        seconds = time.monotonic() - _first_stop[0]
        with pytest.raises(EngineError, match="takes no new work"):
            omni.generate({"prompt": "a", "negative_prompt": "b"}, params(2))
    finally:
        omni.close()
    assert failure.value.cause == "hung" and "rank 0 has been silent" in str(failure.value)
    assert "while idle" in str(failure.value) and seconds < HEARTBEAT_S + DETECT_MARGIN_S
    assert_gone(pids)


def test_rank_stuck_in_its_work_is_caught_by_the_progress_deadline(toy_model):
    """Its heartbeat goes on (the process is fine, its main thread is not): the stall limit
    catches it, here the 2 s floor (its first steps took milliseconds; the ceiling is 6 s); both
    ranks are named, since rank 0 waits for rank 1 in the all-gather and stops marking too."""
    omni = toy_omni(toy_model)
    pids = omni.rank_pids
    start = time.monotonic()
    try:
        with pytest.raises(EngineError) as failure:
            omni.generate({"prompt": "a", "negative_prompt": "hang: b"}, params(10))
    finally:
        omni.close()
    seconds = time.monotonic() - start
    assert failure.value.cause == "hung" and "made no progress" in failure.value.headline
    assert "1" in failure.value.headline.split(" have ")[0].split(" has ")[0]
    assert 2.0 < seconds < 2.0 + DETECT_MARGIN_S
    assert_gone(pids)


def test_watchdog_config_is_checked():
    with pytest.raises(ValueError, match="heartbeat_timeout_s must be at least 1.0"):
        WatchdogConfig(heartbeat_timeout_s=0.5)
    with pytest.raises(ValueError, match="must not exceed stall_ceiling_s"):
        WatchdogConfig(stall_floor_s=100, stall_ceiling_s=10)
    limits = WatchdogConfig(stall_floor_s=60, stall_factor=10, stall_ceiling_s=900)
    assert limits.stall_limit(0) == 900  # nothing timed yet
    assert limits.stall_limit(0.05) == 60  # a 64-pixel edit's step: the floor
    assert limits.stall_limit(30) == 300  # a video's 30-second step: ten of them
    assert limits.stall_limit(600) == 900


# ---- the server -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(models, tmp_path_factory):  # noqa: F811
    server = Server("hang", models["edit"], tmp_path_factory.mktemp("serve-hang"), "--cfg-parallel-size", "2",
                    "--default-steps", "2", "--heartbeat-timeout", str(HEARTBEAT_S), "--shutdown-timeout", "0.5")
    try:
        server.wait_ready()
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    yield server
    server.stop()


def health_pids(server) -> list[int]:
    return server.health()[1]["rank_pids"]


def wait_503_then_200(server, since: float) -> float:
    """Seconds from `since` until /health answered 503; then waits for 200 (new ranks)."""
    server.wait_until(lambda: server.health()[0] == 503, timeout=HEARTBEAT_S + DETECT_MARGIN_S,
                      what="/health 503")
    seconds = time.monotonic() - since
    server.wait_until(lambda: server.health()[0] == 200, timeout=180, what="/health back to 200")
    return seconds


def test_server_stopped_rank_mid_request(server, picture):  # noqa: F811
    old = health_pids(server)
    slow, box = in_thread(server.edit, picture, edit_fields(num_inference_steps="1000", size="128x128"), key=None)
    server.wait_busy()
    os.kill(old[1], signal.SIGSTOP)
    stopped = time.monotonic()
    slow.join(HEARTBEAT_S + DETECT_MARGIN_S)
    status, body = box["result"]
    assert status == 500 and body["error"]["code"] == "engine_failed", body
    message = body["error"]["message"]
    assert message.startswith("rank 1 has been silent for") and "retry shortly" in message, message
    assert "Traceback" not in message and "\n" not in message
    assert wait_503_then_200(server, stopped) < HEARTBEAT_S + DETECT_MARGIN_S
    assert not set(health_pids(server)) & set(old) and not [p for p in old if alive(p)]
    assert server.edit(picture, edit_fields(), key=None)[0] == 200
    assert server.metric('cfgpar_engine_failures_total{cause="hung"}') == 1


def test_server_stopped_rank_while_idle(server, picture):  # noqa: F811
    old = health_pids(server)
    hung_before = server.metric('cfgpar_engine_failures_total{cause="hung"}')
    os.kill(old[0], signal.SIGSTOP)
    assert wait_503_then_200(server, time.monotonic()) < HEARTBEAT_S + DETECT_MARGIN_S
    assert not [p for p in old if alive(p)]
    assert server.edit(picture, edit_fields(), key=None)[0] == 200
    assert server.metric('cfgpar_engine_failures_total{cause="hung"}') == hung_before + 1
    assert "while idle" in server.text()


def test_server_killed_rank_gives_one_sentence_not_library_text(server, picture):  # noqa: F811
    old = health_pids(server)
    slow, box = in_thread(server.edit, picture, edit_fields(num_inference_steps="1000", size="128x128"), key=None)
    server.wait_busy()
    os.kill(old[1], signal.SIGKILL)
    slow.join(30)
    status, body = box["result"]
    message = body["error"]["message"]
    assert status == 500 and "\n" not in message, message
    # the engine sees rank 1's death, or rank 0's collective failing because of it, first
    assert message.startswith(("rank 1 died (exit code -9) during this request", "rank 0 failed while running")), message
    assert "pair.cc" not in message and "GLHF" not in message and "retry shortly" in message
    server.wait_until(lambda: server.health()[0] == 200, timeout=180, what="/health back to 200")


def test_server_shutdown_with_a_request_in_flight_logs_no_error(server, picture):  # noqa: F811
    slow, box = in_thread(server.edit, picture, edit_fields(num_inference_steps="1000", size="128x128"), key=None)
    server.wait_busy()
    start = len(server.text())
    assert server.stop(signal.SIGTERM, timeout=60) == 0
    slow.join(10)
    assert box["result"][0] == 503
    assert " ERROR " not in server.text()[start:], server.text()[start:]


# ---- Ctrl-C ---------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [200, 1000])
def test_ctrl_c_stops_the_cli_and_its_ranks_at_once(tmp_path, steps):
    """SIGINT to the whole process group, as a terminal sends it, once the progress bar runs."""
    cmd = [sys.executable, "-m", "cfgpar.cli", "edit", "--image", str(PICTURE),
           "--prompt", "make the circle blue", "--cfg-parallel-size", "2", "--num-inference-steps", str(steps),
           "--threads-per-rank", "1", "--output", str(tmp_path / "out.png")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    stderr = b""
    deadline = time.monotonic() + 120
    os.set_blocking(proc.stderr.fileno(), False)
    while b"denoise:" not in stderr or b"/" + str(steps).encode() not in stderr:
        assert time.monotonic() < deadline and proc.poll() is None, stderr.decode(errors="replace")
        stderr += proc.stderr.read() or b""
        time.sleep(0.05)
    ranks = child_pids(proc.pid)
    assert len(ranks) >= 2
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(30)
    seconds = time.monotonic() - start
    os.set_blocking(proc.stderr.fileno(), True)
    stderr += proc.stderr.read()
    assert proc.returncode == 130
    assert "cfgpar: interrupted" in stderr.decode().splitlines(), stderr.decode()[-2000:]
    assert seconds < 5, seconds  # measured about 1 s here; the target is 2 s
    assert_gone(ranks, timeout=2)
