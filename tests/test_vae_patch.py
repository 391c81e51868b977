"""The VAE decode shared over ranks (vae_patch_parallel_size): on real gloo processes, 1, 2 and 4
ranks give the same bytes (one thread per rank everywhere), within 2/255 of the untiled decode;
through the engine, the decode shared over 2 and over 3 ranks gives the very same picture."""

import multiprocessing as mp

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLQwenImage
from PIL import Image

from cfgpar import DiffusionParallelConfig, Omni, OmniDiffusionSamplingParams
from cfgpar.distributed.mesh import ParallelMesh, RendezvousInfo, join, leave, serve_rendezvous
from cfgpar.distributed.vae_patch import band_rows, bands_needed, halo_rows, parallel_band_decode
from cfgpar.engine.engine import main_module_hidden
from cfgpar.models.qwen_image.image_vae import use_2d_convs_for_images
from cfgpar.testing.tiny_models import write_tiny_qwen_image

SIDE = 320  # px: 40 latent rows, in bands of 32 (one 256 px tile) and 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An edit model (up to three branches, so up to three ranks) with a small condition image."""
    return write_tiny_qwen_image(tmp_path_factory.mktemp("vae") / "edit", edit=True, vae_scale_factor=8,
                                 max_pixels=16 * 28 * 28, options={"condition_image_area": 64 * 64})


def load_vae(folder):
    return use_2d_convs_for_images(AutoencoderKLQwenImage.from_pretrained(folder / "vae").eval())


def latents(vae) -> torch.Tensor:
    side = SIDE // vae.spatial_compression_ratio
    return torch.randn((1, vae.config.z_dim, 1, side, side), generator=torch.Generator().manual_seed(0))


def _rank(rank: int, rendezvous: RendezvousInfo, folder, out) -> None:
    torch.set_num_threads(1)
    join(rendezvous, rank, torch.device("cpu"))
    size = rendezvous.world_size
    try:
        mesh = ParallelMesh({"cfg": size}, torch.device("cpu"), vae_size=size)
        vae = load_vae(folder)
        pixels = parallel_band_decode(vae, latents(vae), mesh.vae_group, mesh.vae_size, mesh.rank)
        out.put(pixels.numpy() if rank == 0 else rank)  # by value: a tensor would travel as a handle to this process's memory
    finally:
        leave()


def decode_on(size: int, folder) -> torch.Tensor:
    _store, rendezvous = serve_rendezvous(size)  # kept alive while the ranks join
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, rendezvous, folder, out)) for r in range(size)]
    with main_module_hidden():
        for p in procs:
            p.start()
    results = [out.get(timeout=300) for _ in range(size)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (pixels,) = [r for r in results if isinstance(r, np.ndarray)]
    return torch.from_numpy(pixels)


@pytest.mark.exactness
def test_shared_decode_same_bytes_on_1_2_4_ranks_and_within_2_levels_of_the_untiled_decode(folder):
    vae = load_vae(folder)
    z = latents(vae)
    # 3 upsamplings, 2 resnets of two 3x3 convs per up-block, conv_out: 4 + 1/2 + 2 + 1/4 + 1 + 1/8 + 1/2 + 1/8 rows
    assert bands_needed(vae, z) and band_rows(vae) == 32 and halo_rows(vae) == 9
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            untiled = vae.decode(z, return_dict=False)[0]
    finally:
        torch.set_num_threads(threads)
    shared = {size: decode_on(size, folder) for size in (1, 2, 4)}  # 2 bands: one rank, one each, 2 ranks idle
    assert shared[1].shape == untiled.shape == (1, 3, 1, SIDE, SIDE)
    assert torch.equal(shared[1], shared[2]) and torch.equal(shared[1], shared[4])
    levels = ((shared[1] - untiled).abs() * 127.5).max().item()  # [-1, 1] -> 0..255
    assert levels <= 2, levels


@pytest.mark.exactness
@pytest.mark.surface
def test_engine_shared_decode_same_picture_on_2_and_3_ranks_at_same_threads_per_rank(folder):
    picture = Image.new("RGB", (64, 64), (200, 30, 30))
    prompt = {"prompt": "a blue square", "negative_prompt": "blurry", "multi_modal_data": {"image": picture}}
    params = OmniDiffusionSamplingParams(true_cfg_scale=4.0, num_inference_steps=2, seed=1, height=SIDE, width=SIDE)
    outs = {}
    # Two branches on 3 ranks: rank 2 only decodes. (3, 2): the decode's own group, ranks 0 and 1.
    for cfg_size, vae_size in ((2, 1), (2, 2), (3, 3), (3, 2)):
        config = DiffusionParallelConfig(cfg_parallel_size=cfg_size, vae_patch_parallel_size=vae_size)
        with Omni(str(folder), config, threads_per_rank=1, progress_bar=False) as omni:
            (out,) = omni.generate(prompt, params)
        outs[cfg_size, vae_size] = np.asarray(out.images[0])
    assert outs[2, 2].shape == (SIDE, SIDE, 3)
    assert np.array_equal(outs[2, 2], outs[3, 3]) and np.array_equal(outs[2, 2], outs[3, 2])
    assert np.abs(outs[2, 1].astype(int) - outs[2, 2]).max() <= 2  # against rank 0 decoding alone, untiled
