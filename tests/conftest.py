import os
import sys
from pathlib import Path

import pytest

# The CPU kernels of the weakest machine CI may run on: ATen's dispatch, oneDNN's and MKL's
# capped at AVX2. An AVX-512 machine can hide what an AVX2 machine computes (different thread
# counts rounding differently in the last bit), so `make test` runs the exactness tests a
# second time with CFGPAR_TEST_CPU=avx2. Set here, before torch is imported, so that this
# process and every rank, CLI and server the tests start inherit them.
AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
if os.environ.get("CFGPAR_TEST_CPU") == "avx2":
    os.environ.update(AVX2_CAPS)
elif os.environ.get("CFGPAR_TEST_CPU"):
    raise SystemExit(f"CFGPAR_TEST_CPU={os.environ['CFGPAR_TEST_CPU']!r}: the only cap is 'avx2'.")

sys.path.insert(0, str(Path(__file__).parent))  # toy_pipeline, importable by spawned ranks too
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from toy_pipeline import write_toy_model  # noqa: E402


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory) -> Path:
    return write_toy_model(tmp_path_factory.mktemp("toy"))


# The tiny models several modules share, built once a session (their weights come from fixed seeds).
TINY_EDIT_MAX_PIXELS = 64 * 28 * 28
"""The edit model's vision-tower input: small keeps the tests fast; parity holds for any processor config."""


@pytest.fixture(scope="session")
def tiny_qwen_t2i(tmp_path_factory) -> Path:
    """A tiny Qwen-Image (text-to-image) folder in the hub layout."""
    from cfgpar.testing.tiny_models import write_tiny_qwen_image

    return write_tiny_qwen_image(tmp_path_factory.mktemp("tiny-qwen") / "t2i", edit=False, vae_scale_factor=8)


@pytest.fixture(scope="session")
def tiny_qwen_edit(tmp_path_factory) -> Path:
    """A tiny Qwen-Image-Edit folder in the hub layout."""
    from cfgpar.testing.tiny_models import write_tiny_qwen_image

    return write_tiny_qwen_image(tmp_path_factory.mktemp("tiny-qwen") / "edit", edit=True,
                                 max_pixels=TINY_EDIT_MAX_PIXELS, vae_scale_factor=8)


@pytest.fixture(scope="session")
def tiny_qwen_edit_plus(tmp_path_factory) -> Path:
    """A tiny Qwen-Image-Edit-2509/2511 folder (one to three pictures), its pictures encoded at about
    80x80 px (not diffusers' 1024x1024: for tests that compare cfgpar with itself)."""
    from cfgpar.testing.tiny_models import write_tiny_qwen_image

    return write_tiny_qwen_image(tmp_path_factory.mktemp("tiny-qwen") / "edit-plus", edit=True, plus=True,
                                 max_pixels=TINY_EDIT_MAX_PIXELS, vae_scale_factor=8,
                                 options={"condition_image_area": 80 * 80})


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """kind -> a tiny Wan folder of that kind (cfgpar.testing.tiny_wan's kinds), each built once."""
    from cfgpar.testing.tiny_wan import write_tiny_wan

    root, built = tmp_path_factory.mktemp("tiny-wan"), {}

    def folder(kind: str) -> Path:
        if kind not in built:
            built[kind] = write_tiny_wan(root / kind, kind=kind)
        return built[kind]

    return folder


def child_pids(parent: int | None = None, *, skip_trackers: bool = True) -> set[int]:
    """Live (non-zombie) children of `parent` (default: this process), without multiprocessing's
    resource tracker unless `skip_trackers` is False."""
    me = str(parent or os.getpid())
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] != me or fields[0] == "Z":
            continue
        if not skip_trackers or b"resource_tracker" not in _cmdline(entry):
            pids.add(int(entry.name))
    return pids


def _cmdline(entry: Path) -> bytes:
    """multiprocessing's resource tracker is started once per interpreter and lives on by design."""
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""


def pytest_sessionstart(session):
    """Refuse a capped run whose caps did not reach ATen (torch imported before this file)."""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    if os.environ.get("CFGPAR_TEST_CPU") == "avx2" and capability not in ("AVX2", "DEFAULT"):
        raise pytest.UsageError(f"CFGPAR_TEST_CPU=avx2 but ATen dispatches {capability} kernels: torch was "
                                "imported before tests/conftest.py set ATEN_CPU_CAPABILITY.")


def pytest_report_header(config):
    import torch

    capped = ", ".join(f"{k}={os.environ[k]}" for k in AVX2_CAPS if k in os.environ) or "none"
    return f"cpu kernels: ATen {torch.backends.cpu.get_cpu_capability()}; caps: {capped}"
