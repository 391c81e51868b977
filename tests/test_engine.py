"""The engine on real processes and real gloo collectives, with the toy pipeline. Every run
uses one thread per rank: the promise is the same picture for the same compute per rank."""

import os
import time

import numpy as np
import pytest

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.engine.engine import EngineError
from cfgpar.models.pipeline import RequestError
from conftest import child_pids

PROMPT = {"prompt": "a red circle", "negative_prompt": "blurry"}


def run(model, cfg_size, prompt=PROMPT, **params):
    params = {"true_cfg_scale": 4.0, "num_inference_steps": 6, "seed": 7, **params}
    with Omni(model, DiffusionParallelConfig(cfg_parallel_size=cfg_size), threads_per_rank=1, progress_bar=False) as omni:
        (out,) = omni.generate(prompt, OmniDiffusionSamplingParams(**params))
    return out


def pixels(out):
    return np.stack([np.asarray(im) for im in out.images])


@pytest.mark.exactness
@pytest.mark.parametrize("cfg_size", [2, 3])
def test_three_branches_same_picture_as_sequential_at_same_threads_per_rank(toy_model, cfg_size):
    seq = run(toy_model, 1, image_guidance_scale=1.5)
    par = run(toy_model, cfg_size, image_guidance_scale=1.5)
    assert seq.metrics.num_branches == par.metrics.num_branches == 3
    assert np.array_equal(pixels(seq), pixels(par))


@pytest.mark.exactness
def test_two_branches_same_picture_as_sequential_at_same_threads_per_rank(toy_model):
    seq, par = run(toy_model, 1, num_outputs_per_prompt=2), run(toy_model, 2, num_outputs_per_prompt=2)
    assert par.metrics.num_branches == 2 and len(par.images) == 2
    assert np.array_equal(pixels(seq), pixels(par))
    # guidance changes the picture: the test would catch a loop that ignores the negative branch
    assert not np.array_equal(pixels(seq), pixels(run(toy_model, 1, true_cfg_scale=1.0, num_outputs_per_prompt=2)))


@pytest.mark.exactness
def test_two_branches_on_three_ranks_same_picture_at_same_threads_per_rank(toy_model, capfd):
    assert np.array_equal(pixels(run(toy_model, 1)), pixels(run(toy_model, 3)))
    assert "CFG rank(s) 2 sit idle" in capfd.readouterr().err  # said once, as the no-guidance warning


@pytest.mark.exactness
def test_no_guidance_splits_outputs_across_ranks_same_picture_at_same_threads_per_rank(toy_model, capfd):
    seq = run(toy_model, 1, true_cfg_scale=1.0, num_outputs_per_prompt=3)
    par = run(toy_model, 2, true_cfg_scale=1.0, num_outputs_per_prompt=3)
    assert par.metrics.num_branches == 1 and len(par.images) == 3
    np.testing.assert_array_equal(pixels(seq), pixels(par))
    assert "no speedup" in capfd.readouterr().err


@pytest.mark.exactness
def test_omitted_seed_is_shared_by_all_ranks(toy_model):
    with Omni(toy_model, DiffusionParallelConfig(cfg_parallel_size=2), threads_per_rank=1, progress_bar=False) as omni:
        (out,) = omni.generate(PROMPT, OmniDiffusionSamplingParams(num_inference_steps=4))
    again = run(toy_model, 1, seed=out.seed, num_inference_steps=4)
    assert np.array_equal(pixels(out), pixels(again))


def test_request_error_keeps_engine_running(toy_model):
    with Omni(toy_model, DiffusionParallelConfig(cfg_parallel_size=2), threads_per_rank=1, progress_bar=False) as omni:
        with pytest.raises(RequestError, match="refuses prompts"):
            omni.generate({"prompt": "refuse: x"}, OmniDiffusionSamplingParams(num_inference_steps=2, seed=1))
        # the one prompt rule (the CLI's and the server's too) refuses before any rank works
        with pytest.raises(ValueError, match="prompt must not be empty"):
            omni.generate({"prompt": "  "}, OmniDiffusionSamplingParams(num_inference_steps=2, seed=1))
        (out,) = omni.generate(PROMPT, OmniDiffusionSamplingParams(num_inference_steps=2, seed=1))
        assert len(out.images) == 1


@pytest.mark.parametrize("prefix,message", [("fail:", "toy failure injected on rank 1"), ("exit:", "exit code 13")])
def test_failing_rank_reaches_caller(toy_model, prefix, message):
    with Omni(toy_model, DiffusionParallelConfig(cfg_parallel_size=2), threads_per_rank=1, progress_bar=False) as omni:
        start = time.monotonic()
        with pytest.raises(EngineError, match=message):
            omni.generate({"prompt": "a", "negative_prompt": prefix + "x"}, OmniDiffusionSamplingParams(num_inference_steps=5, seed=1))
        assert time.monotonic() - start < 30
        with pytest.raises(EngineError, match="takes no new work"):
            omni.generate(PROMPT, OmniDiffusionSamplingParams(num_inference_steps=2, seed=1))
    assert not child_pids()


KILL_A_RANK = """
import os, signal, sys, threading, time
sys.path.insert(0, %r)
from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.engine.engine import EngineError
omni = Omni(%r, DiffusionParallelConfig(cfg_parallel_size=2), threads_per_rank=1, progress_bar=True)
pids = omni.engine.pids
threading.Timer(1.5, os.kill, (omni.engine.pids[1], signal.SIGKILL)).start()
start = time.monotonic()
try:
    omni.generate({"prompt": "slow: a", "negative_prompt": "b"}, OmniDiffusionSamplingParams(num_inference_steps=40, seed=1))
except EngineError as exc:
    print("CAUGHT", time.monotonic() - start, str(exc).splitlines()[0])
omni.close()
print("ALIVE", *[p for p in pids if os.path.exists(f"/proc/{p}")])
"""


def test_killed_rank_gives_one_error_line_and_no_leak_warning(toy_model):
    """A user's program whose rank is killed mid-request: the caller gets the engine's error
    within seconds, the engine prints one line, and Python's resource tracker finds nothing
    leaked at exit (the ranks' progress bars once left a semaphore behind)."""
    import subprocess
    import sys

    program = KILL_A_RANK % (os.path.dirname(__file__), str(toy_model))
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report, alive = done.stdout.splitlines()
    assert alive == "ALIVE", "ranks left running after close()"
    caught, seconds, message = report.split(maxsplit=2)
    assert caught == "CAUGHT" and float(seconds) < 15 and message.strip() == "rank 1 died (exit code -9).", done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip() and "denoise" not in line]
    assert lines == ["cfgpar engine stopping: rank 1 died (exit code -9)."], done.stderr


def test_close_leaves_no_process(toy_model):
    before = child_pids()
    omni = Omni(toy_model, DiffusionParallelConfig(cfg_parallel_size=3), threads_per_rank=1, progress_bar=False)
    pids = set(omni.engine.pids)
    assert len(pids) == 3 and pids <= child_pids()
    omni.close()
    omni.close()  # idempotent
    assert not (child_pids() - before)


def test_two_engines_side_by_side(toy_model):
    params = OmniDiffusionSamplingParams(num_inference_steps=3, seed=3)
    cfg2 = DiffusionParallelConfig(cfg_parallel_size=2)
    with Omni(toy_model, cfg2, threads_per_rank=1, progress_bar=False) as a, \
         Omni(toy_model, cfg2, threads_per_rank=1, progress_bar=False) as b:
        assert np.array_equal(pixels(a.generate(PROMPT, params)[0]), pixels(b.generate(PROMPT, params)[0]))


def test_generate_takes_a_list_and_checks_prompts(toy_model):
    with Omni(toy_model, threads_per_rank=1, progress_bar=False) as omni:
        outs = omni.generate(["one", {"prompt": "two"}], OmniDiffusionSamplingParams(num_inference_steps=2, seed=0))
        assert [o.prompt for o in outs] == ["one", "two"]
        assert all(o.metrics.total_s > 0 for o in outs)
        with pytest.raises(ValueError, match="unknown prompt keys"):
            omni.generate({"prompt": "x", "negative": "y"})
        with pytest.raises(ValueError, match="must be a PIL image"):
            omni.generate({"prompt": "x", "multi_modal_data": {"image": "input.png"}})


def test_interpreter_exit_stops_the_ranks(toy_model):
    import subprocess
    import sys

    program = (
        "import sys; sys.path.insert(0, %r)\n"
        "from cfgpar import DiffusionParallelConfig, Omni\n"
        "omni = Omni(%r, DiffusionParallelConfig(cfg_parallel_size=2), threads_per_rank=1)\n"
        "print(*omni.engine.pids)\n"  # no close(): exit must stop the ranks
    ) % (os.path.dirname(__file__), str(toy_model))
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{p}") for p in pids)
