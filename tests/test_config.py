import pytest

from cfgpar import DiffusionParallelConfig, OmniDiffusionSamplingParams
from cfgpar.distributed.mesh import check_degrees


def test_parallel_config():
    assert DiffusionParallelConfig().world_size == 1
    assert DiffusionParallelConfig(cfg_parallel_size=3).world_size == 3
    with pytest.raises(ValueError, match="cfg_parallel_size must be between 1 and 3, got 4"):
        DiffusionParallelConfig(cfg_parallel_size=4)
    with pytest.raises(TypeError, match="cfg_parallel_size must be an int"):
        DiffusionParallelConfig(cfg_parallel_size=2.0)
    with pytest.raises(TypeError):
        DiffusionParallelConfig(2)  # keyword-only
    with pytest.raises(TypeError):
        DiffusionParallelConfig(world_size=2)  # derived
    assert DiffusionParallelConfig(cfg_parallel_size=3, vae_patch_parallel_size=2).vae_patch_parallel_size == 2
    with pytest.raises(ValueError, match=r"vae_patch_parallel_size must be between 1 and 2 \(the 2 rank\(s\) of this layout\), got 4"):
        DiffusionParallelConfig(cfg_parallel_size=2, vae_patch_parallel_size=4)
    with pytest.raises(ValueError, match="vae_patch_parallel_size must be between 1 and 1"):
        DiffusionParallelConfig(vae_patch_parallel_size=0)


@pytest.mark.parametrize("field,value,message", [
    ("true_cfg_scale", -1.0, "true_cfg_scale must be between 0.0 and 100.0"),
    ("true_cfg_scale", float("nan"), "true_cfg_scale must be a finite number"),
    ("num_inference_steps", 0, "num_inference_steps must be between 1 and 1000, got 0"),
    ("seed", -5, "seed must be between 0"),
    ("height", 8, "height must be between 16 and 4096, got 8"),
    ("width", 5000, "width must be between 16 and 4096, got 5000"),
    ("num_outputs_per_prompt", 17, "num_outputs_per_prompt must be between 1 and 16"),
    ("max_sequence_length", 2000, "max_sequence_length must be between 1 and 1024"),
    ("image_guidance_scale", 1e9, "image_guidance_scale must be between"),
])
def test_sampling_params_reject(field, value, message):
    with pytest.raises(ValueError, match=message):
        OmniDiffusionSamplingParams(**{field: value})


def test_sampling_params_types_and_defaults():
    p = OmniDiffusionSamplingParams(true_cfg_scale=4, num_inference_steps=50)
    assert p.seed is None and p.num_outputs_per_prompt == 1
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        OmniDiffusionSamplingParams(num_inference_steps=2.5)
    with pytest.raises(TypeError):
        OmniDiffusionSamplingParams(4.0)  # keyword-only


def test_degrees_must_multiply_to_world_size():
    check_degrees({"cfg": 2}, 2)
    with pytest.raises(ValueError, match=r"multiply to 2 \(cfg=2\) but the world size is 4"):
        check_degrees({"cfg": 2}, 4)


def test_threads_per_rank_default(monkeypatch):
    """$OMP_NUM_THREADS where set (as torchrun sets it), else the cores split over the ranks:
    the default changes with the layout, which is why equality tests pin the threads."""
    from cfgpar.omni import available_cores, default_threads_per_rank

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert default_threads_per_rank(1) == available_cores()
    assert default_threads_per_rank(available_cores() * 2) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads_per_rank(1) == default_threads_per_rank(2) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not-a-number")  # ignored, as OpenMP ignores it
    assert default_threads_per_rank(1) == available_cores()
