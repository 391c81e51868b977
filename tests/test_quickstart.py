"""The guide's Quick Start program, unchanged apart from the package name and the model path."""

import subprocess
import sys
import textwrap

from PIL import Image

from cfgpar.testing.tiny_models import write_tiny_qwen_image

QUICK_START = textwrap.dedent('''
    from cfgpar import Omni
    from cfgpar.diffusion.data import DiffusionParallelConfig
    from cfgpar.inputs.data import OmniDiffusionSamplingParams
    from PIL import Image
    omni = Omni(model=MODEL, parallel_config=DiffusionParallelConfig(cfg_parallel_size=2))
    input_image = Image.open("input.png").convert("RGB")
    outputs = omni.generate(
        {"prompt": "turn this cat to a dog", "negative_prompt": "low quality, blurry",
         "multi_modal_data": {"image": input_image}},
        OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=50),
    )
''')


def test_quick_start_runs_as_in_the_guide(tmp_path):
    model = write_tiny_qwen_image(tmp_path / "Qwen-Image-Edit", edit=True, max_pixels=16 * 28 * 28, vae_scale_factor=8)
    Image.new("RGB", (48, 32), (200, 30, 30)).save(tmp_path / "input.png")
    # The guide's program leaves the size to the pipeline (~1024x1024 from the input's aspect
    # ratio); the tiny model is fast enough for that on CPU, the saved check proves it ran.
    program = f"MODEL = {str(model)!r}\n" + QUICK_START + textwrap.dedent('''
        img = outputs[0].images[0]
        img.save("edited_image.png")
        print("SIZE", img.size, "TIMES", sorted(vars(outputs[0].metrics)))
    ''')
    # Saved as a script and run as one: spawned ranks must not re-run the top-level code.
    (tmp_path / "quickstart.py").write_text(program)
    done = subprocess.run([sys.executable, "quickstart.py"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SIZE (1248, 832)" in done.stdout
    assert Image.open(tmp_path / "edited_image.png").size == (1248, 832)
