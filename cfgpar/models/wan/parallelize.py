"""Sequence parallelism for Wan's WanTransformer3DModel, applied from outside with hooks.

Wan's latents are a video [B, C, F, H, W], not packed tokens, so the loop keeps them whole on
every rank and the model shards inside (torchtitan's way: no model code changes):

    patch embedding (whole)  ->  [B, L, d] video tokens, L = F' H' W'
    blocks[0] pre-hook       ->  this rank's shard [B, N, d], N = ceil(L / P) (shard_index's rule;
                                 TI2V's per-token modulation [B, L, 6, d] sliced the same way)
    rope hook                ->  the rotary cos/sin of the shard's tokens
    every block              ->  self-attention over the group (sp_attention, no text tokens);
                                 cross-attention is the shard's queries against the whole text:
                                 no exchange; the MLP is per token
    blocks[-1] hook          ->  all-gather of the shards: [B, L, d] again on every rank
    norm_out, proj_out, unpatchify (whole)

Every sp rank of a branch then holds the same prediction, the CFG all-gather and the scheduler
step run on whole latents, and the ranks stay in step without a broadcast.
"""

from __future__ import annotations

import torch

from cfgpar.distributed.mesh import ParallelMesh
from cfgpar.distributed.sequence_parallel import SequenceShards, TokenLayouts, check_ulysses_degree
from cfgpar.distributed.sp_attention import sp_attention


def parallelize(pipeline, mesh: ParallelMesh) -> None:
    """Apply this rank's sequence parallelism to each of the pipeline's experts (no-op without SP)."""
    if mesh.sp_size > 1:
        for expert in (pipeline.transformer, pipeline.transformer_2):
            if expert is not None:
                WanSequenceParallel(expert, mesh)


class WanSequenceParallel:
    """Hooks that run a WanTransformer3DModel's blocks on this rank's shard of the video tokens."""

    def __init__(self, transformer, mesh: ParallelMesh):
        check_ulysses_degree(transformer.config.num_attention_heads, mesh.size("ulysses"))
        self.mesh, self.groups = mesh, mesh.sequence
        self.shards = SequenceShards.of(mesh)
        self.patch = tuple(transformer.config.patch_size)
        self._layouts = TokenLayouts(mesh)
        self.layout = None
        self.length = 0
        blocks = transformer.blocks
        self._handles = [
            transformer.register_forward_pre_hook(self._begin, with_kwargs=True),
            transformer.rope.register_forward_hook(self._shard_rotary),
            blocks[0].register_forward_pre_hook(self._shard_hidden),
            blocks[-1].register_forward_hook(self._gather_hidden),
        ]
        for block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._shard_modulation))
            block.attn1.set_processor(WanSequenceParallelAttnProcessor(self))

    def _begin(self, module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        f, h, w = hidden.shape[2:]
        self.length = (f // self.patch[0]) * (h // self.patch[1]) * (w // self.patch[2])
        self.layout = self._layouts.of((self.length,), hidden.device)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.layout.rows)

    def _shard_rotary(self, module, args, output):
        cos, sin = output  # [1, L, 1, head_dim] each
        return self._rows(cos), self._rows(sin)

    def _shard_hidden(self, module, args):
        return (self._rows(args[0]), *args[1:])

    def _shard_modulation(self, module, args):
        temb = args[2]  # [B, 6, d], or TI2V's per-token [B, L, 6, d]
        if temb.ndim == 4 and temb.shape[1] == self.length:
            return (*args[:2], self._rows(temb), *args[3:])
        return None

    def _gather_hidden(self, module, args, output):
        return self.shards.gather(output, self.length)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding (WanAttnProcessor's inner apply_rotary_emb): interleaved pairs."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSequenceParallelAttnProcessor:
    """WanAttnProcessor's self-attention (attn1), with the attention itself over the group."""

    def __init__(self, sp: WanSequenceParallel):
        self.sp = sp

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the sequence-parallel Wan processor serves self-attention (attn1) only.")
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k = attn.norm_q(q), attn.norm_k(k)  # RMS norm across all heads, per token: local
        q, k, v = (x.unflatten(2, (attn.heads, -1)) for x in (q, k, v))
        if rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        none = q[:, :0]  # Wan's self-attention has no text tokens
        _, out = sp_attention(none, none, none, q, k, v, self.sp.layout.blocks, self.sp.groups)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))
