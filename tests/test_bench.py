"""`cfgpar bench --quick` end to end: cfgpar's engines and the bare program (the same forwards
without cfgpar, on one process and on two gloo processes) run in interleaved rounds, and the
report gives cfgpar's speedup as a share of the bare one. Times are not asserted: this is the
plumbing, the figures are the benchmark's."""

import json
import subprocess
import sys


def test_quick_bench_reports_share_of_the_bare_speedup(tmp_path):
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "cfgpar.cli", "bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "bench.json").read_text())
    versus = results["versus_bare"]
    assert len(versus["rounds"]) == results["config"]["headline_rounds"] == 1
    head = results["headline"]
    assert head["bare_1"]["loop_s"] > 0 and head["bare_2"]["loop_s"] > 0
    assert len(head["bare_2"]["forward_s_by_rank"]) == 2
    # the share is cfgpar's ratio over the bare ratio, from the same round's runs
    assert abs(versus["denoise_share"] - versus["denoise"] / versus["bare"]) < 1e-9
    assert abs(versus["bare"] - head["bare_1"]["loop_s"] / head["bare_2"]["loop_s"]) < 1e-9
    assert abs(versus["denoise"] - head["cfgpar_1"]["denoise_s"] / head["cfgpar_2"]["denoise_s"]) < 1e-9
    report = (out / "bench.md").read_text()
    assert "bare program, forwards + all-gather (the machine)" in report
    assert f"**{versus['denoise_share']:.1%}**" in report and f"**{versus['end_to_end_share']:.1%}**" in report
    assert "share of the bare speedup" in done.stdout
    # the sequence-parallel cases: Ulysses 2 and Ring 2 against one rank, with the exchange time
    (case,) = results["sequence_parallel"]
    for name in ("ulysses_2", "ring_2"):
        assert case["rows"][name]["sp_exchange_s"] > 0 and case[name]["exchange_per_step_s"] > 0
        assert abs(case[name]["share"] - case[name]["speedup"] / case["bare"]) < 1e-9
    assert case["rows"]["cfgpar_1"]["sp_exchange_s"] == 0
    assert "| 16 | 64 | 2 | ulysses 2 |" in report and "| 16 | 64 | 2 | ring 2 |" in report
    # the video case: Wan text-to-video at cfg 2 against 1, as a share of the bare ratio of its round
    clip = results["video"]
    assert clip["frames"] == 5 and clip["tokens"] == 2 * 4 * 4
    assert abs(clip["versus_bare"]["denoise_share"] - clip["versus_bare"]["denoise"] / clip["versus_bare"]["bare"]) < 1e-9
    assert clip["rows"]["bare_2"]["loop_s"] > 0 and clip["rows"]["cfgpar_2"]["branches"] == 2
    assert f"**{clip['versus_bare']['denoise_share']:.1%}**" in report and "Video (Wan text-to-video" in report
    # the Bagel case: a three-branch edit at cfg 2 against 1 (two branches on rank 0), the limit 1.5x
    # on its guided steps, as a share of the bare program's ratio with the same branch placement
    case = results["bagel"]
    assert case["steps"] == 4 and case["guided_steps"] == 3 and abs(case["limit"] - (3 * 3 + 0) / (2 * 3 + 0)) < 1e-9
    assert case["rows"]["cfgpar_2"]["branches"] == 3 and case["rows"]["bare_2"]["loop_s"] > 0
    assert f"**{case['versus_bare']['denoise_share']:.1%}**" in report and "Bagel (random weights" in report
