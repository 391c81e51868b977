"""The server's engine thread and queue with a fake Omni: order, cancellation, failures, restarts.
No processes; each test takes milliseconds."""

from __future__ import annotations

import threading
import time

import pytest

from cfgpar.engine.engine import EngineError
from cfgpar.inputs.data import OmniDiffusionSamplingParams
from cfgpar.models.info import ModelInfo
from cfgpar.models.pipeline import RequestError
from cfgpar.outputs import OmniRequestOutput
from cfgpar.request import StageMetrics
from cfgpar.server.engine_thread import FAILED, READY, EngineThread, Job
from cfgpar.server.errors import ServeError
from cfgpar.server.metrics import Metrics

PARAMS = OmniDiffusionSamplingParams(num_inference_steps=1)


class FakeOmni:
    """Runs prompts by name: "wait..." blocks until `release` is set, "...fail" raises EngineError
    (the engine stops), "bad" raises RequestError. Records what it ran."""

    def __init__(self, log: list, release: threading.Event):
        self.log, self.release, self.closed = log, release, False
        self.model_info = ModelInfo(task="edit", tasks=("edit",), max_branches=2, size_unit=16)
        self.failure: EngineError | None = None
        self.rank_pids: list[int] = []

    def check(self):
        if self.failure is not None:
            raise self.failure

    def interrupt(self):
        self.release.set()

    def generate(self, prompt, params):
        text = prompt["prompt"]
        if text.startswith("wait"):
            self.release.wait(10)
        if text.endswith("fail"):
            self.failure = EngineError("rank 1 died (exit code -9).", "died")
            raise self.failure
        if text == "bad":
            raise RequestError("the pipeline refuses this")
        self.log.append(text)
        return [OmniRequestOutput(request_id=0, prompt=text, images=[], seed=1, metrics=StageMetrics())]

    def close(self):
        self.closed = True


class Harness:
    def __init__(self, queue_size=4, fail_builds_after: int | None = None):
        self.ran, self.release, self.omnis = [], threading.Event(), []
        self.fail_builds_after = fail_builds_after
        self.metrics = Metrics()
        self.worker = EngineThread(self.build, queue_size=queue_size, metrics=self.metrics, restart_attempts=2,
                                   restart_backoff_s=0.01)
        self.worker.start()
        wait_for(lambda: self.worker.state == READY)

    def build(self):
        if self.fail_builds_after is not None and len(self.omnis) >= self.fail_builds_after:
            raise EngineError("rank 0 failed while starting:\nTraceback ...\nOSError: weights are gone")
        self.omnis.append(FakeOmni(self.ran, self.release))
        return self.omnis[-1]

    def submit(self, prompt: str) -> Job:
        job = Job({"prompt": prompt}, PARAMS, deadline=time.monotonic() + 30)
        self.worker.submit(job)
        return job


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.release.set()
    h.worker.close()


def test_fifo_one_at_a_time_and_queue_full(harness):
    first = harness.submit("wait")
    wait_for(lambda: first.future.running())
    jobs = [harness.submit(f"p{i}") for i in range(4)]
    with pytest.raises(ServeError) as full:
        harness.submit("one too many")
    assert full.value.status == 429
    harness.release.set()
    for job in jobs:
        job.future.result(5)
    assert harness.ran == ["wait", "p0", "p1", "p2", "p3"]


def test_cancelled_or_abandoned_jobs_never_run(harness):
    first = harness.submit("wait")
    wait_for(lambda: first.future.running())
    cancelled, gone, late, kept = (harness.submit(p) for p in ("cancelled", "gone", "late", "kept"))
    assert harness.worker.cancel(cancelled, "client_disconnected")
    assert not harness.worker.cancel(first, "timeout")  # running: runs to its end
    gone.client_gone.set()  # left before the engine thread took it
    late.deadline = time.monotonic() - 1
    harness.release.set()
    kept.future.result(5)
    assert harness.ran == ["wait", "kept"]
    assert cancelled.future.cancelled() and gone.future.cancelled() and late.future.cancelled()
    text = harness.metrics.render().decode()
    assert 'cfgpar_requests_dropped_total{reason="client_disconnected"} 2.0' in text
    assert 'cfgpar_requests_dropped_total{reason="timeout"} 1.0' in text


def test_request_error_is_400_and_engine_goes_on(harness):
    with pytest.raises(ServeError) as bad:
        harness.submit("bad").future.result(5)
    assert bad.value.status == 400 and "refuses" in bad.value.message
    harness.submit("ok").future.result(5)
    assert len(harness.omnis) == 1


def test_engine_failure_is_500_then_restart_serves_the_queue(harness):
    failing = harness.submit("wait, then fail")
    wait_for(lambda: failing.future.running())
    queued = harness.submit("after")
    harness.release.set()
    with pytest.raises(ServeError) as failed:
        failing.future.result(5)
    assert failed.value.status == 500 and failed.value.message.startswith("rank 1 died (exit code -9) during this request")
    assert harness.metrics.engine_failures.labels("died")._value.get() == 1
    queued.future.result(5)  # not lost: it ran on the rebuilt engine
    assert len(harness.omnis) == 2 and harness.omnis[0].closed
    assert harness.worker.restarts == 1 and harness.worker.state == READY


def test_failed_restart_says_so_and_fails_fast():
    h = Harness(fail_builds_after=1)
    try:
        with pytest.raises(ServeError):
            h.submit("fail").future.result(5)
        wait_for(lambda: h.worker.state == FAILED)
        assert "weights are gone" in h.worker.detail  # the rank's last traceback line, not just the headline
        with pytest.raises(ServeError) as refused:
            h.submit("x")
        assert refused.value.status == 503
    finally:
        h.worker.close()


def test_close_fails_queued_jobs_and_closes_the_engine(harness):
    first = harness.submit("wait")
    wait_for(lambda: first.future.running())
    queued = harness.submit("queued")
    threading.Timer(0.1, harness.release.set).start()
    harness.worker.close(grace_s=5)
    with pytest.raises(ServeError) as stopped:
        queued.future.result(1)
    assert stopped.value.status == 503 and "shutting down" in stopped.value.message
    first.future.result(1)  # the one in flight finished within its grace
    assert harness.omnis[0].closed
    with pytest.raises(ServeError) as refused:
        harness.submit("late")
    assert refused.value.status == 503
