"""The `cfgpar` command and the guide's example scripts, as a user runs them."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cfgpar.testing.tiny_models import write_tiny_qwen_image
from cfgpar.video_io import read_mp4

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "offline_inference"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_wan):
    root = tmp_path_factory.mktemp("cli")
    # Small condition images and outputs keep it fast.
    options = {"condition_image_area": 64 * 64, "default_image_size": 64}
    edit = write_tiny_qwen_image(root / "edit", edit=True, max_pixels=16 * 28 * 28, vae_scale_factor=8, options=options)
    t2i = write_tiny_qwen_image(root / "t2i", edit=False, vae_scale_factor=8, options=options)
    picture = root / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    edit_plus = write_tiny_qwen_image(root / "edit-plus", edit=True, plus=True, max_pixels=16 * 28 * 28,
                                      vae_scale_factor=8, options=options)
    second = root / "second.png"
    Image.new("RGB", (48, 32), (20, 200, 40)).save(second)
    return {"edit": edit, "t2i": t2i, "picture": picture, "wan": tiny_wan("t2v"), "wan_i2v": tiny_wan("i2v-a14b"),
            "edit_plus": edit_plus, "second": second}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cfgpar.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def pixels(path):
    return np.asarray(Image.open(path))


@pytest.mark.exactness
@pytest.mark.surface
def test_edit_on_1_and_2_ranks_same_picture_at_same_threads_per_rank(models, tmp_path):
    outs = []
    for size in (1, 2):
        out = tmp_path / f"edit{size}.png"
        done = cli("edit", "--image", models["picture"], "--prompt", "make the circle blue", "--model", models["edit"],
                   "--num-inference-steps", 3, "--cfg-parallel-size", size, "--threads-per-rank", 1, "--output", out)
        assert done.returncode == 0, done.stderr[-2000:]
        layout = "1 rank" if size == 1 else "2 ranks: cfg 2"
        assert f"wrote {out}" in done.stdout and f"on {layout}" in done.stdout and "denoise" in done.stdout
        assert "denoise" in done.stderr  # the progress bar, from rank 0
        outs.append(pixels(out))
    assert outs[0].shape == (64, 64, 3) and np.array_equal(outs[0], outs[1])


def test_generate(models, tmp_path):
    out = tmp_path / "gen.png"
    done = cli("generate", "--prompt", "a blue square", "--model", models["t2i"], "--num-inference-steps", 2,
               "--height", 48, "--width", 32, "--output", out, "--cfg-parallel-size", 1, "--ring-degree", 2)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(out).size == (32, 48) and "on 2 ranks: ring 2" in done.stdout


@pytest.mark.surface
def test_edit_with_several_pictures_from_the_cli_and_the_example_script(models, tmp_path):
    """Qwen-Image-Edit-2509/2511 takes one to three pictures: `--image` repeated, the same request
    from `cfgpar edit` and from the example script gives the same picture; one picture fewer does not."""
    common = ["--model", models["edit_plus"], "--prompt", "the second picture's colour on the first",
              "--num-inference-steps", 2, "--cfg-parallel-size", 2, "--threads-per-rank", 1]
    script = EXAMPLES / "image_to_image" / "image_edit.py"
    runs = {"cli": ("cli", [models["picture"], models["second"]]), "script": ("script", [models["picture"], models["second"]]),
            "one": ("cli", [models["picture"]])}
    outs = {}
    for name, (how, images) in runs.items():
        out = tmp_path / f"{name}.png"
        pictures = [word for image in images for word in ("--image", image)]
        if how == "cli":
            done = cli("edit", *pictures, *common, "--output", out)
        else:
            done = subprocess.run([sys.executable, script, *map(str, pictures + common), "--output", str(out)],
                                  capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        outs[name] = pixels(out)
    assert np.array_equal(outs["cli"], outs["script"])
    assert not np.array_equal(outs["cli"], outs["one"])  # the second picture counts


def frames(path) -> np.ndarray:
    return np.stack([np.asarray(frame) for frame in read_mp4(path)[0]])


def test_video(models, tmp_path):
    out = tmp_path / "clip.mp4"
    done = cli("video", "--model", models["wan"], "--prompt", "a cat running", "--num-frames", 9, "--height", 48,
               "--width", 64, "--num-inference-steps", 2, "--fps", 8, "--threads-per-rank", 1, "--output", out)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "9 frames of 64x48 at 8 fps, 2 CFG branch(es) on 2 ranks: cfg 2" in done.stdout
    assert "denoise" in done.stderr  # the progress bar, from rank 0
    clip, fps = read_mp4(out)
    assert len(clip) == 9 and clip[0].size == (64, 48) and fps == 8


@pytest.mark.parametrize("args,message", [
    (["edit", "--image", "missing.png", "--prompt", "x"], "--image 'missing.png': no such file"),
    (["edit", "--image", "{notimage}", "--prompt", "x"], "is not a picture PIL can read"),
    (["generate", "--prompt", "x", "--height", "8", "--model", "{t2i}"], "height must be between 16 and 4096, got 8"),
    (["generate", "--prompt", "x", "--model", "no/such-model"], "could not fetch model 'no/such-model'"),
    (["generate", "--prompt", "x", "--model", "{edit}"], "is an edit model; `cfgpar generate` needs a text-to-image model: use `cfgpar edit`"),
    (["generate", "--prompt", "x", "--model", "{t2i}", "--vae-patch-parallel-size", "3"],
     "vae_patch_parallel_size must be between 1 and 2 (the 2 rank(s) of this layout), got 3"),
    (["generate", "--prompt", "x", "--model", "{t2i}", "--ulysses-degree", "4"],
     "ulysses_degree=4 does not divide the model's 2 attention heads"),
    (["edit", "--image", "{picture}", "--prompt", "x", "--model", "{edit}", "--output", "out.txt"], "--output must end in"),
    (["video", "--prompt", "x", "--model", "{wan}", "--output", "clip.gif"], "--output must end in .mp4"),
    (["video", "--prompt", "x", "--model", "{t2i}"], "makes images; `cfgpar video` makes videos"),
    (["generate", "--prompt", "x", "--model", "{wan}"], "makes videos; `cfgpar generate` makes images: use `cfgpar video`"),
    (["video", "--prompt", "x", "--model", "{wan}", "--vae-patch-parallel-size", "2"],
     "the VAE decode over ranks is for image models"),
    (["edit", "--image", "{picture}", "--prompt", "", "--model", "{edit}"], "prompt must not be empty"),
    (["generate", "--prompt", "x", "--model", "/nonexistent/model"], "model folder '/nonexistent/model': no such folder"),
    (["edit", "--image", "{picture}", "--prompt", "x", "--model", "{t2i}"],
     "is a text-to-image model; `cfgpar edit` needs an edit model: use `cfgpar generate`"),
])
def test_errors_are_one_line(models, tmp_path, args, message):
    notimage = tmp_path / "not-an-image.png"
    notimage.write_text("hello")
    args = [a.format(notimage=notimage, t2i=models["t2i"], edit=models["edit"], picture=models["picture"],
                     wan=models["wan"]) for a in args]
    done = cli(*args, cwd=tmp_path)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("cfgpar: error:")]
    assert len(lines) == 1 and message in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "denoise" not in done.stderr  # refused before any rank ran


def test_example_script_checks_its_picture_before_any_rank_starts(tmp_path):
    script = EXAMPLES / "image_to_image" / "image_edit.py"
    done = subprocess.run([sys.executable, script, "--image", "missing.png", "--prompt", "x"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == "cfgpar: error: --image 'missing.png': no such file."


@pytest.mark.exactness
@pytest.mark.surface
def test_example_scripts_same_picture_on_1_and_2_ranks_at_same_threads_per_rank(models, tmp_path):
    """The guide's flags, plus --threads-per-rank 1: without it, one rank would take both cores
    and two ranks one each, and a GEMM split over two threads may round differently."""
    for script, extra in ((EXAMPLES / "image_to_image" / "image_edit.py", ["--image", models["picture"]]),
                          (EXAMPLES / "text_to_image" / "text_to_image.py", [])):
        outs = []
        for size in (1, 2):
            out = tmp_path / f"{script.stem}-{size}.png"
            done = subprocess.run(
                [sys.executable, script, "--model", models["edit" if extra else "t2i"], *extra, "--prompt",
                 "make the circle blue", "--negative-prompt", "low quality, blurry", "--cfg-scale", "4.0", "--output",
                 out, "--cfg-parallel-size", str(size), "--num-inference-steps", "2", "--threads-per-rank", "1"],
                capture_output=True, text=True, timeout=600, cwd=script.parent)
            assert done.returncode == 0, done.stderr[-2000:]
            outs.append(pixels(out))
        assert np.array_equal(outs[0], outs[1])
    # and with the image tokens split over two ranks (Ulysses: within one level, see test_sequence_parallel.py)
    out = tmp_path / "ulysses.png"
    done = subprocess.run(
        [sys.executable, script, "--model", models["t2i"], "--prompt", "make the circle blue", "--negative-prompt",
         "low quality, blurry", "--cfg-scale", "4.0", "--output", out, "--cfg-parallel-size", "1", "--ulysses-degree",
         "2", "--num-inference-steps", "2", "--threads-per-rank", "1"],
        capture_output=True, text=True, timeout=600, cwd=script.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert np.abs(pixels(out).astype(int) - outs[0]).max() <= 1


def test_video_example_script(models, tmp_path):
    """image_to_video.py, which drives text_to_video.py's code with --image (the flags of both).
    cfg 1 and 2 give the same frames bit for bit: tests/test_wan.py, through the same loop."""
    out = tmp_path / "i2v.mp4"
    done = subprocess.run(
        [sys.executable, EXAMPLES / "image_to_video" / "image_to_video.py", "--model", models["wan_i2v"], "--image",
         models["picture"], "--guidance-scale-high", "3.0", "--prompt", "a cat turns its head", "--negative-prompt",
         "blurry", "--height", "32", "--width", "48", "--num-frames", "5", "--num-inference-steps", "2", "--output",
         out, "--cfg-parallel-size", "2", "--threads-per-rank", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Saved video to {out} (5 frames" in done.stdout and "cfg_parallel_size=2" in done.stdout
    assert frames(out).shape == (5, 32, 48, 3)
