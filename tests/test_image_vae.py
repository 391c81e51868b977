import copy

import torch
from diffusers import AutoencoderKLQwenImage

from cfgpar.models.qwen_image.image_vae import use_2d_convs_for_images


def test_2d_image_path_matches_the_video_vae():
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True]).eval()
    fast = use_2d_convs_for_images(copy.deepcopy(vae))
    z, x = torch.randn(2, 4, 1, 6, 8), torch.rand(2, 3, 1, 48, 64) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(fast.decode(z).sample, vae.decode(z).sample, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fast.encode(x).latent_dist.mode(), vae.encode(x).latent_dist.mode(), atol=1e-5, rtol=1e-4)
        # video: frames after the first see cached frames and keep the 3-D path
        video = torch.randn(1, 4, 2, 6, 8)
        torch.testing.assert_close(fast.decode(video).sample, vae.decode(video).sample, atol=1e-5, rtol=1e-4)
