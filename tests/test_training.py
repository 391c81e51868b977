"""training/train.py end to end at toy size: two gloo ranks run every stage, the folder they
write loads in cfgpar and edits, and the same command gives the same weights."""

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams

ROOT = Path(__file__).resolve().parent.parent
# Every stage, a few steps each: the real code paths, not the real budget.
TOY = ["--vae-steps", "3", "--vae-pool", "40", "--edit-sources", "12", "--captions", "12",
       "--steps", "3", "--finetune-steps", "2", "--warmup", "2"]


def train(tmp: Path, *extra: str) -> Path:
    assets = tmp / "assets"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "training" / "train.py"), *TOY, *extra,
         "--work", str(tmp / "work"), "--assets", str(assets)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return assets


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    return [train(tmp_path_factory.mktemp(f"run{i}")) for i in range(2)]


def test_same_command_same_weights(two_runs):
    first, second = two_runs
    for part in ("vae", "transformer"):
        name = "diffusion_pytorch_model.safetensors"
        a = (first / "shapes-edit" / part / name).read_bytes()
        assert a == (second / "shapes-edit" / part / name).read_bytes(), f"{part} weights differ between runs"


def test_trained_folder_loads_and_edits(two_runs):
    edit_folder = two_runs[0] / "shapes-edit"
    assert (two_runs[0] / "shapes-t2i" / "transformer").is_symlink()
    with Omni(str(edit_folder), DiffusionParallelConfig(cfg_parallel_size=1), threads_per_rank=1,
              progress_bar=False) as engine:
        assert engine.model_info.task == "edit"
        (out,) = engine.generate(
            {"prompt": "make it blue", "negative_prompt": "low quality, blurry",
             "multi_modal_data": {"image": Image.new("RGB", (64, 64), (200, 30, 30))}},
            OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=2, seed=0),
        )
    assert out.images[0].size == (64, 64)


@pytest.mark.parametrize("flags, message", [
    (["--ranks", "2", "--batch-edit", "25"], "--batch-edit must be a multiple of --ranks (2)"),
    (["--device", "gpu"], "--device must be cpu or cuda (got 'gpu')"),
    (["--device", "cuda", "--ranks", "2"], "--device cuda trains on one rank: pass --ranks 1 (got 2)"),
])
def test_bad_flags_get_one_line(tmp_path, flags, message):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "training" / "train.py"), *flags,
         "--work", str(tmp_path / "w"), "--assets", str(tmp_path / "a")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "w").exists()
