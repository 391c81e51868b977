"""Bagel (BAGEL-7B-MoT) on a tiny random-weight folder in the official hub layout: loading, the
official token layout and schedule, the combine rules against the official code's formulas,
three branches on 1, 2 and 3 real gloo ranks bit for bit, and the errors a user can cause."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.distributed.mesh import ParallelMesh
from cfgpar.engine.denoise_loop import generate
from cfgpar.models.bagel.combine import bagel_cfg
from cfgpar.models.loader import ModelLoadError, pipeline_path, resolve_model
from cfgpar.omni import make_request
from cfgpar.models.bagel.pipeline import BagelPipeline
from cfgpar.models.pipeline import RequestError
from cfgpar.testing.tiny_bagel import write_tiny_bagel
from sp_ranks import run_layout

PROMPT = "make the circle blue"
SIZE = dict(height=32, width=48)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_bagel(tmp_path_factory.mktemp("bagel") / "BAGEL-7B-MoT")


@pytest.fixture(scope="module")
def pipeline(folder):
    torch.set_num_threads(1)
    return BagelPipeline.from_pretrained(folder, device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def picture():
    y, x = np.mgrid[0:96, 0:128]
    return Image.fromarray(np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8))


def params(**overrides) -> OmniDiffusionSamplingParams:
    return OmniDiffusionSamplingParams(**{**dict(true_cfg_scale=4.0, num_inference_steps=6, seed=5), **overrides})


def one_rank(pipeline, request):
    return generate(pipeline, request, ParallelMesh({"cfg": 1, "ring": 1, "ulysses": 1}, torch.device("cpu")))


def test_folder_without_model_index_is_bagel_and_loads_the_official_keys(folder, pipeline):
    assert resolve_model(folder) == folder.resolve()
    assert pipeline_path(folder) == "cfgpar.models.bagel.pipeline:BagelPipeline"
    info = pipeline.info()
    assert info.tasks == ("text-to-image", "edit") and info.max_branches == 3
    # 2 autoencoder levels x 2 x 2 latent patches: 4 px a token; 16 tokens a side in the table
    assert info.size_unit == 4 and info.max_side == 64
    tok = pipeline.tokenizer
    assert [pipeline.marks.bos, pipeline.marks.eos, pipeline.marks.start_of_image, pipeline.marks.end_of_image] == [
        tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")]


def test_missing_file_is_one_clear_error(folder, tmp_path):
    broken = tmp_path / "bagel"
    broken.mkdir()
    for f in folder.iterdir():
        if f.name != "ae.safetensors":
            (broken / f.name).symlink_to(f)
    with pytest.raises(ModelLoadError, match=r"Bagel folder .* lacks ae\.safetensors"):
        resolve_model(broken)


def test_contexts_follow_the_official_token_layout(pipeline, picture):
    """Text: [<|im_start|>, prompt, <|im_end|>] at positions 0..T+1; an image block (VAE, then ViT)
    takes n + 2 cache slots and one position. Edit: full = VAE, ViT, text; text-unconditional =
    VAE, ViT; image-unconditional = text alone."""
    request = make_request(0, {"prompt": PROMPT, "multi_modal_data": {"image": picture}}, params(image_guidance_scale=2.0))
    guidance = pipeline.guidance(request)
    assert [b.name for b in guidance.branches] == ["full", "text-unconditional", "image-unconditional"]
    plan = pipeline.prepare(request, [0])
    full, no_text, no_image = (pipeline.encode(request, b, plan) for b in guidance.branches)
    text = len(pipeline.tokenizer.encode(PROMPT, add_special_tokens=False)) + 2
    # 128 x 96 -> the VAE size 64 x 48 (long side 64, multiples of 4): 16 x 12 latent tokens;
    # the ViT size 32 x 24 (its image size 32, patch 4): 8 x 6 patches.
    vae_block, vit_block = 16 * 12 + 2, 8 * 6 + 2
    assert (no_text.length, no_text.next_position) == (vae_block + vit_block, 2)
    assert (full.length, full.next_position) == (vae_block + vit_block + text, 2 + text)
    assert (no_image.length, no_image.next_position) == (text, text)
    assert plan.extras["height"] == 48 and plan.extras["width"] == 64


def test_schedule_and_interval_run_no_unused_prediction(pipeline, monkeypatch):
    """N steps: N - 1 evaluations at the shifted points of linspace(1, 0, N); the unconditional
    branch runs only at the steps inside cfg_interval."""
    calls = []
    velocity = pipeline.model.velocity
    monkeypatch.setattr(pipeline.model, "velocity", lambda cache, x, t, *a: calls.append((cache.length, float(t))) or velocity(cache, x, t, *a))
    request = make_request(0, {"prompt": PROMPT}, params(num_inference_steps=10, cfg_interval=(0.4, 1.0), **SIZE))
    one_rank(pipeline, request)
    t = torch.linspace(1, 0, 10)
    t = 3.0 * t / (1 + 2.0 * t)
    guided = [float(x) for x in t[:-1] if 0.4 < x <= 1.0]
    assert [s for _, s in calls if _ == 0] == guided  # the empty text-unconditional context
    assert [s for n, s in calls if n > 0] == [float(x) for x in t[:-1]]
    assert 0 < len(guided) < 9


def official_combine(v_t, cfg_text_v_t, cfg_img_v_t, cfg_text_scale, cfg_img_scale, cfg_renorm_type, cfg_renorm_min):
    """The official _forward_flow's combine (modeling/bagel/bagel.py), one image [L, C]."""
    if cfg_renorm_type == "text_channel":
        v_t_text_ = cfg_text_v_t + cfg_text_scale * (v_t - cfg_text_v_t)
        norm_v_t = torch.norm(v_t, dim=-1, keepdim=True)
        norm_v_t_text_ = torch.norm(v_t_text_, dim=-1, keepdim=True)
        scale = (norm_v_t / (norm_v_t_text_ + 1e-8)).clamp(min=cfg_renorm_min, max=1.0)
        v_t_text = v_t_text_ * scale
        return cfg_img_v_t + cfg_img_scale * (v_t_text - cfg_img_v_t) if cfg_img_scale > 1.0 else v_t_text
    v_t_text_ = cfg_text_v_t + cfg_text_scale * (v_t - cfg_text_v_t)
    v_t_ = cfg_img_v_t + cfg_img_scale * (v_t_text_ - cfg_img_v_t) if cfg_img_scale > 1.0 else v_t_text_
    if cfg_renorm_type == "global":
        norm_v_t, norm_v_t_ = torch.norm(v_t), torch.norm(v_t_)
    else:
        norm_v_t, norm_v_t_ = torch.norm(v_t, dim=-1, keepdim=True), torch.norm(v_t_, dim=-1, keepdim=True)
    return v_t_ * (norm_v_t / (norm_v_t_ + 1e-8)).clamp(min=cfg_renorm_min, max=1.0)


@pytest.mark.parametrize("renorm", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("image_scale", [1.0, 2.0])
@pytest.mark.parametrize("renorm_min", [0.0, 0.5])
def test_combine_is_the_official_combine(renorm, image_scale, renorm_min):
    gen = torch.Generator().manual_seed(0)
    full, no_text, no_image = (torch.randn(1, 30, 16, generator=gen) for _ in range(3))
    got = bagel_cfg([full, no_text, no_image], text_scale=4.0, image_scale=image_scale, renorm_type=renorm,
                    renorm_min=renorm_min, image_branch=True)
    want = official_combine(full[0], no_text[0], no_image[0], 4.0, image_scale, renorm, renorm_min)
    torch.testing.assert_close(got[0], want, rtol=1e-6, atol=1e-6)
    # text-to-image: the image-unconditional context is the full one, its prediction the full one's
    got = bagel_cfg([full, no_text], text_scale=4.0, image_scale=image_scale, renorm_type=renorm,
                    renorm_min=renorm_min, image_branch=False)
    torch.testing.assert_close(got[0], official_combine(full[0], no_text[0], full[0], 4.0, image_scale, renorm,
                                                        renorm_min), rtol=1e-6, atol=1e-6)


def _requests(picture):
    edit = {"prompt": PROMPT, "multi_modal_data": {"image": picture}}
    t2i = {"prompt": "a red circle on the left"}
    return [
        make_request(0, t2i, params(**SIZE)),  # defaults: interval (0.4, 1], global, image scale 1.5
        make_request(1, {**t2i, "negative_prompt": "blurry"}, params(cfg_renorm_type="channel", **SIZE)),
        make_request(2, edit, params(image_guidance_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")),
        make_request(3, edit, params(image_guidance_scale=1.5, cfg_renorm_type="global", cfg_renorm_min=0.2)),
        make_request(4, edit, params(image_guidance_scale=1.0, cfg_renorm_type="channel")),
        make_request(5, t2i, params(true_cfg_scale=1.0, num_outputs_per_prompt=2, **SIZE)),
    ]


@pytest.mark.exactness
def test_three_branches_on_1_2_3_ranks_same_pictures_at_same_threads_per_rank(folder, picture):
    """Text-to-image and edits, every renorm type, cfg_interval cutting the schedule and not; the
    3-branch edits on 3 ranks, on 2 (two on rank 0) and on 1, one thread per rank."""
    pictures = {cfg: run_layout({"cfg": cfg, "ring": 1, "ulysses": 1}, [(folder, _requests(picture))])[0]
                for cfg in (1, 2, 3)}
    for cfg in (2, 3):
        for i, (got, want) in enumerate(zip(pictures[cfg], pictures[1])):
            assert np.array_equal(got, want), f"request {i}, cfg {cfg}"
    assert pictures[1][0].shape == (1, 32, 48, 3) and pictures[1][2].shape == (1, 48, 64, 3)
    assert pictures[1][5].shape[0] == 2
    # guidance does something: the edit with image guidance differs from the one without
    assert not np.array_equal(pictures[1][2], pictures[1][4])


@pytest.mark.parametrize("overrides, message", [
    (dict(think=True), "think mode"),
    (dict(num_inference_steps=1), "at least 2"),
    (dict(height=128, width=48), "between 4 and 64 px"),
    (dict(guidance_scale=5.0), "guidance_scale applies to .*Wan only; Bagel does not take it"),
])
def test_request_errors(pipeline, overrides, message):
    request = make_request(0, {"prompt": PROMPT}, params(**{**SIZE, **overrides}))
    with pytest.raises(RequestError, match=message):
        pipeline.prepare(request, [0]) if "height" in overrides else pipeline.check(request)


def test_cfg_parallel_size_4_is_refused(folder):
    with pytest.raises(ValueError, match=r"cfg_parallel_size must be between 1 and 3, got 4"):
        Omni(str(folder), DiffusionParallelConfig(cfg_parallel_size=4))


def test_params_validated():
    with pytest.raises(ValueError, match="cfg_renorm_type must be one of"):
        OmniDiffusionSamplingParams(cfg_renorm_type="local")
    with pytest.raises(ValueError, match="cfg_interval"):
        OmniDiffusionSamplingParams(cfg_interval=(0.8, 0.2))


@pytest.mark.exactness
@pytest.mark.surface
def test_cli_example_and_server_at_cfg_3_give_the_one_rank_pictures(folder, pipeline, picture, tmp_path):
    """The guide's surfaces on the tiny Bagel at --cfg-parallel-size 3, one thread per rank, against
    one rank in this process: `cfgpar edit` (three branches, three ranks), the example script's
    text-to-image (two branches: rank 2 idle), and `cfgpar serve` answering the OpenAI client's
    generate and edit. (Two ranks, two branches on rank 0: the layout test above.)"""
    import base64
    import io
    import subprocess
    import sys
    from pathlib import Path

    from test_server import Server, client

    steps = dict(num_inference_steps=6, seed=3)
    image_in = tmp_path / "in.png"
    picture.save(image_in)
    edit = {"prompt": PROMPT, "multi_modal_data": {"image": picture}}
    t2i = {"prompt": "a red circle on the left"}
    want = {name: np.asarray(one_rank(pipeline, make_request(0, p, params(**steps, **extra))).images[0])
            for name, p, extra in (("edit", edit, dict(image_guidance_scale=2.0)), ("t2i", t2i, SIZE),
                                   ("t2i-channel", t2i, dict(cfg_renorm_type="channel", **SIZE)))}

    def run(*cmd):
        done = subprocess.run([sys.executable, *map(str, cmd), "--threads-per-rank", "1"], capture_output=True,
                              text=True, timeout=600, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    out = run("-m", "cfgpar.cli", "edit", "--model", folder, "--image", image_in, "--prompt", PROMPT,
              "--image-guidance-scale", "2", "--cfg-parallel-size", "3", "--num-inference-steps", "6", "--seed", "3",
              "-o", tmp_path / "edit.png")
    assert "3 CFG branch(es) on 3 ranks: cfg 3" in out
    assert np.array_equal(np.asarray(Image.open(tmp_path / "edit.png")), want["edit"])
    script = Path(__file__).parents[1] / "examples" / "offline_inference" / "bagel" / "bagel.py"
    run(script, "--model", folder, "--prompt", t2i["prompt"], "--cfg-parallel-size", "3", "--num-inference-steps",
        "6", "--seed", "3", "--height", "32", "--width", "48", "--output", tmp_path / "t2i.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "t2i.png")), want["t2i"])

    server = Server("bagel", folder, tmp_path, "--cfg-parallel-size", "3").wait_ready()
    try:
        api = client(server, None)
        extra = {"num_inference_steps": 6, "seed": 3}
        got = api.images.generate(model=folder.name, prompt=t2i["prompt"], size="48x32",
                                  extra_body={**extra, "cfg_renorm_type": "channel"})
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(got.data[0].b64_json)))),
                              want["t2i-channel"])
        got = api.images.edit(model=folder.name, image=("in.png", image_in.read_bytes(), "image/png"), prompt=PROMPT,
                              extra_body={**extra, "image_guidance_scale": 2.0})
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(got.data[0].b64_json)))),
                              want["edit"])
        bad = server.call("POST", "/v1/images/generations", json.dumps({"prompt": "x", "think": True}).encode(),
                          {"Content-Type": "application/json"}, key=None)
        assert bad[0] == 400 and "think mode" in bad[1]["error"]["message"]
    finally:
        server.stop()


def test_cost_model_counts_the_official_guided_steps():
    from cfgpar.models.bagel.cost import BagelLoad, bagel_table, loop_s

    edit, t2i = BagelLoad(edit=True), BagelLoad(edit=False)
    # shifted t = 3t / (1 + 2t) > 0.4  <=>  t > 2/11: points 0..40 of linspace(1, 0, 50), the last never run
    assert edit.guided_steps() == 41 and BagelLoad(interval=(0.0, 1.0)).guided_steps() == 49
    assert 2.0 < loop_s(edit, 1) / loop_s(edit, 3) < 3.0
    assert abs(loop_s(t2i, 3) / loop_s(t2i, 2) - 1) < 1e-3  # two branches: a third rank adds only its all-gather share
    assert "| edit, 3 branches | 41 of 49 |" in bagel_table()


def test_full_size_layout_loads_the_official_key_names():
    """BAGEL-7B-MoT's sizes (Qwen2.5-7B, SigLIP so400m at 980 px, FLUX's autoencoder), built on the
    meta device: the checkpoint's key names map onto the modules, and the autoencoder's size is
    read from its tensors (ch 128, ch_mult 1 2 4 4, 2 blocks, 16 latent channels: 8 px a latent pixel)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    from cfgpar.models.bagel.autoencoder import autoencoder_config
    from cfgpar.models.bagel.llm import llm_config
    from cfgpar.models.bagel.model import Bagel
    from cfgpar.models.bagel.vision import vit_config
    from cfgpar.testing.tiny_bagel import flux_autoencoder_state

    with torch.device("meta"):
        state = flux_autoencoder_state(ch=128, ch_mult=(1, 2, 4, 4), blocks=2, z=16)
        config = autoencoder_config(state)
        vae = AutoencoderKL(**config)
        model = Bagel(llm_config({"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                  "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                                  "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}),
                      vit_config({"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
                                  "num_hidden_layers": 27, "patch_size": 14, "image_size": 980}),
                      latent_channels=16, max_latent_size=64, vit_side=70)
    assert (config["block_out_channels"], config["layers_per_block"], config["latent_channels"]) == ([128, 256, 512, 512], 2, 16)
    missing, unexpected = vae.load_state_dict(convert_ldm_vae_checkpoint(state, config), strict=False, assign=True)
    assert not missing and not unexpected
    keys = set(model.state_dict())
    layer = "language_model.model.layers.27."
    for name in ("self_attn.q_proj_moe_gen.weight", "self_attn.k_norm_moe_gen.weight", "mlp_moe_gen.down_proj.weight",
                 "input_layernorm_moe_gen.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight"):
        assert layer + name in keys
    assert {"language_model.model.norm_moe_gen.weight", "vit_model.vision_model.encoder.layers.25.mlp.fc2.weight",
            "vit_model.vision_model.embeddings.patch_embedding.weight", "latent_pos_embed.pos_embed",
            "vit_pos_embed.pos_embed", "time_embedder.mlp.2.weight", "connector.fc1.weight"} <= keys
    assert "vit_model.vision_model.encoder.layers.26.mlp.fc2.weight" not in keys  # the official drops the last layer
    assert model.state_dict()["vit_model.vision_model.embeddings.patch_embedding.weight"].shape == (1152, 588)
    assert model.state_dict()["latent_pos_embed.pos_embed"].shape == (4096, 3584)


def test_plan_predicts_bagel_on_1_to_3_gpus(folder, capsys):
    from cfgpar.cli import main

    assert main(["plan", "--gpus", "4", "--model", "ByteDance-Seed/BAGEL-7B-MoT"]) == 0
    out = capsys.readouterr().out
    assert "| edit, 3 branches | 41 of 49 |" in out and "3 GPUs s" in out and "4 GPUs" not in out
    assert "--cfg-parallel-size 3" in out
    assert main(["plan", "--gpus", "2", "--model", str(folder), "--size", "512x512"]) == 0  # a local Bagel folder
    assert "512x512" in capsys.readouterr().out
