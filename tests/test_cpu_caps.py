"""The AVX2 caps of `make test`'s second run (conftest.AVX2_CAPS) take effect on this machine:
ATen dispatches AVX2 kernels, oneDNN runs AVX2 code, and on an AVX-512 machine both compute
different last bits than uncapped, so the second run really tests what an AVX2 machine computes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import AVX2_CAPS

PROBE = """
import hashlib, torch, torch.nn.functional as F
g = torch.Generator().manual_seed(0)
q = torch.randn(1, 6, 300, 64, generator=g)
attention = F.scaled_dot_product_attention(q, q, q)  # ATen's own vectorised kernel
conv = F.conv2d(torch.randn(1, 64, 32, 32, generator=g), torch.randn(64, 64, 3, 3, generator=g), padding=1)  # oneDNN
digest = lambda t: hashlib.sha256(t.numpy().tobytes()).hexdigest()[:16]
print(torch.backends.cpu.get_cpu_capability(), digest(attention), digest(conv))
"""


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def probe(capped: bool) -> tuple[str, str, str, str]:
    """(ATen capability, attention digest, conv digest, oneDNN's ISA line) in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in AVX2_CAPS and k != "CFGPAR_TEST_CPU"}
    env.update(AVX2_CAPS if capped else {}, ONEDNN_VERBOSE="1")
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    isa = next((line for line in done.stdout.splitlines() if ",isa:" in line), "")
    capability, attention, conv = done.stdout.strip().splitlines()[-1].split()
    return capability, attention, conv, isa


@pytest.mark.skipif("avx2" not in cpu_flags(), reason="the caps only matter on a machine with AVX2")
def test_avx2_caps_take_effect():
    """What the second run relies on, whatever the vendor calls its instructions: capped, ATen
    dispatches its AVX2 kernels and oneDNN reports AVX2 code; on a CPU with wider vectors the
    uncapped run reports other ISAs, and the kernels it selects compute other last bits."""
    capability, attention, conv, isa = probe(capped=True)
    assert capability == "AVX2"
    assert "AVX2" in isa.rpartition("isa:")[2], isa
    if "avx512f" in cpu_flags():
        full = probe(capped=False)
        assert full[0] != "AVX2" and full[3] != isa, (full, isa)
        assert attention != full[1], "ATEN_CPU_CAPABILITY=avx2 did not change ATen's kernels"
        assert conv != full[2], "ONEDNN_MAX_CPU_ISA=AVX2 did not change oneDNN's kernels"
