"""Sequence parallelism for QwenImageTransformer2DModel, applied from outside with hooks.

The loop hands the transformer this rank's shard of the packed image tokens (and of an edit's
condition-image tokens: distributed/sequence_parallel.py's rule); the hooks slice what the model
derives from `img_shapes` (rotary positions, the zero_cond_t modulation index) to the shard, and
every block's attention runs over the group (sp_attention). No model code changes.
"""

from __future__ import annotations

from math import prod

from cfgpar.distributed.mesh import ParallelMesh
from cfgpar.distributed.sequence_parallel import TokenLayout, TokenLayouts, check_ulysses_degree
from cfgpar.distributed.sp_attention import sp_attention


def parallelize(pipeline, mesh: ParallelMesh) -> None:
    """Apply this rank's sequence parallelism to the pipeline's transformer (no-op without SP)."""
    if mesh.sp_size > 1:
        QwenImageSequenceParallel(pipeline.transformer, mesh)


class QwenImageSequenceParallel:
    """Hooks that make a QwenImageTransformer2DModel's forward run on this rank's token shard.

    The pipeline calls the model as before, with its shard as hidden_states and the full
    img_shapes; the hooks slice what the model derives from img_shapes (rotary positions, the
    zero_cond_t modulation index) to the shard, and every block's attention runs sp_attention."""

    def __init__(self, transformer, mesh: ParallelMesh):
        config = transformer.config
        check_ulysses_degree(config.num_attention_heads, mesh.size("ulysses"))
        self.mesh = mesh
        self.groups = mesh.sequence
        self._layouts = TokenLayouts(mesh)
        self.layout: TokenLayout | None = None
        self._handles = [
            transformer.register_forward_pre_hook(self._begin, with_kwargs=True),
            transformer.pos_embed.register_forward_hook(self._shard_rotary),
        ]
        for block in transformer.transformer_blocks:
            self._handles.append(block.register_forward_pre_hook(self._shard_modulation, with_kwargs=True))
            block.attn.set_processor(SequenceParallelAttnProcessor(self))

    def _begin(self, module, args, kwargs):
        img_shapes = kwargs["img_shapes"]
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        segments = tuple(prod(shape) for shape in img_shapes[0])
        self.layout = self._layouts.of(segments, hidden.device, hidden.shape[1])

    def _shard_rotary(self, module, args, output):
        img_freqs, txt_freqs = output
        return img_freqs.index_select(0, self.layout.rows), txt_freqs

    def _shard_modulation(self, module, args, kwargs):
        index = kwargs.get("modulate_index")
        if index is not None:
            kwargs["modulate_index"] = index.index_select(1, self.layout.rows)
        return args, kwargs


class SequenceParallelAttnProcessor:
    """QwenDoubleStreamAttnProcessor2_0's computation, with the attention itself over the group."""

    def __init__(self, sp: QwenImageSequenceParallel):
        self.sp = sp

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        if encoder_hidden_states_mask is not None or attention_mask is not None:
            raise ValueError("sequence parallelism runs without text padding masks (one prompt per forward).")
        head_dim = attn.inner_dim // attn.heads
        img = [proj(hidden_states).unflatten(-1, (-1, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
        txt = [proj(encoder_hidden_states).unflatten(-1, (-1, head_dim))
               for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        for i, (img_norm, txt_norm) in enumerate(((attn.norm_q, attn.norm_added_q), (attn.norm_k, attn.norm_added_k))):
            if img_norm is not None:
                img[i] = img_norm(img[i])
            if txt_norm is not None:
                txt[i] = txt_norm(txt[i])
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            for i in (0, 1):
                img[i] = apply_rotary_emb_qwen(img[i], img_freqs, use_real=False)
                txt[i] = apply_rotary_emb_qwen(txt[i], txt_freqs, use_real=False)
        txt_out, img_out = sp_attention(*txt, *img, self.sp.layout.blocks, self.sp.groups)
        img_out = attn.to_out[0](img_out.flatten(2, 3).to(img[0].dtype).contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        return img_out, attn.to_add_out(txt_out.flatten(2, 3).to(txt[0].dtype).contiguous())
