"""Sequence parallelism for FluxTransformer2DModel, applied from outside with hooks.

The loop hands the transformer this rank's shard of the packed image tokens (and of Kontext's
input-picture tokens: distributed/sequence_parallel.py's rule, one segment each). A hook on the
transformer reads the segments from the full `img_ids` (the output's tokens have first id 0,
Kontext's picture 1) and keeps this rank's rows of them, so the rotary embedding covers the text
and this rank's image tokens. Every attention runs over the group (sp_attention): the
double-stream blocks' text comes from its own projections; the single-stream blocks hold
[text; image shard] in one sequence, split at the text length. No model code changes.
"""

from __future__ import annotations

import torch

from cfgpar.distributed.mesh import ParallelMesh
from cfgpar.distributed.sequence_parallel import TokenLayout, TokenLayouts, check_ulysses_degree
from cfgpar.distributed.sp_attention import sp_attention


def parallelize(pipeline, mesh: ParallelMesh) -> None:
    """Apply this rank's sequence parallelism to the pipeline's transformer (no-op without SP)."""
    if mesh.sp_size > 1:
        FluxSequenceParallel(pipeline.transformer, mesh)


class FluxSequenceParallel:
    """Hooks that make a FluxTransformer2DModel's forward run on this rank's token shard."""

    def __init__(self, transformer, mesh: ParallelMesh):
        check_ulysses_degree(transformer.config.num_attention_heads, mesh.size("ulysses"))
        self.mesh = mesh
        self.groups = mesh.sequence
        self._layouts = TokenLayouts(mesh)
        self.layout: TokenLayout | None = None
        self.text_len = 0
        self._handle = transformer.register_forward_pre_hook(self._begin, with_kwargs=True)
        for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
            if block.attn.fused_projections:
                raise ValueError("sequence parallelism runs FLUX's attention with separate q, k, v projections; "
                                 "unfuse them (unfuse_qkv_projections) first.")
            block.attn.set_processor(SequenceParallelFluxAttnProcessor(self))

    def _begin(self, module, args, kwargs):
        """Pick this rank's layout from the full img_ids [L0 (+ L1), 3] and keep its rows of them."""
        img_ids, hidden = kwargs["img_ids"], kwargs["hidden_states"]
        # Segments in order of their first id: the output's tokens (0), then the picture's (1).
        segments = tuple(torch.unique_consecutive(img_ids[:, 0], return_counts=True)[1].tolist())
        self.layout = self._layouts.of(segments, hidden.device, hidden.shape[1])
        self.text_len = kwargs["encoder_hidden_states"].shape[1]
        kwargs["img_ids"] = img_ids.index_select(0, self.layout.rows)
        return args, kwargs


class SequenceParallelFluxAttnProcessor:
    """FluxAttnProcessor's computation, with the attention itself over the group."""

    def __init__(self, sp: FluxSequenceParallel):
        self.sp = sp

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ValueError("sequence parallelism runs FLUX without attention masks.")
        # [B, N, H, D] each; a single-stream block's N is text then image (its hidden_states are both).
        q, k, v = (proj(hidden_states).unflatten(-1, (-1, attn.head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:  # double-stream: the text's own projections, in front
            eq, ek, ev = (proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            q = torch.cat([attn.norm_added_q(eq), q], dim=1)
            k = torch.cat([attn.norm_added_k(ek), k], dim=1)
            v = torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:  # covers the text and this rank's image tokens (the hook's img_ids)
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        s = self.sp.text_len
        txt, img = sp_attention(q[:, :s], k[:, :s], v[:, :s], q[:, s:], k[:, s:], v[:, s:], self.sp.layout.blocks,
                                self.sp.groups)
        txt, img = (x.flatten(2, 3).to(q.dtype) for x in (txt, img))
        if encoder_hidden_states is None:  # single-stream: one sequence out, as it came in
            return torch.cat([txt, img], dim=1)
        img = attn.to_out[1](attn.to_out[0](img.contiguous()))
        return img, attn.to_add_out(txt.contiguous())
