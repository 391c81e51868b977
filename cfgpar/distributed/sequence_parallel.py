"""Sequence parallelism (Ulysses x Ring), applied to a transformer from outside.

The image tokens of a branch are split along the sequence over its sp ranks (the ring x ulysses
ranks of distributed/mesh.py). A forward sees one or more image segments, one per entry of
`img_shapes` (an edit: the output's tokens, then the condition image's). Each segment of L tokens
is padded to P * ceil(L / P) and cut into P contiguous shards; rank p holds shard p of every
segment, concatenated in segment order. Padding repeats the segment's last token, so every value
stays finite through per-token rules (the norm-preserving combine divides by a token's norm);
attention drops padded keys (sp_attention.py) and `gather` drops padded rows.

Two halves, one rule (`shard_index`):
- the loop's: `SequenceShards.shard` cuts the latents (and a plan's per-token inputs) once per
  request; the scheduler and the combine run on the shard; `gather` rebuilds the full latents.
- the model's: `parallelize` hooks a pipeline's QwenImageTransformer2DModel (torchtitan's way:
  no model code changes) so that a forward on a shard slices the rotary positions and the
  per-token modulation index to the shard and runs its attention over the group.
  Wan's video latents are not packed tokens: the loop keeps them whole and sp_wan.py's hooks
  shard the tokens inside the transformer and gather them before its output projection.

diffusers 0.42's own context parallelism (enable_parallelism with its _cp_plan) was tried first;
docs/parallelism.md says what it does on gloo and why this module exists instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
import torch.distributed as dist

from cfgpar.distributed.mesh import ParallelMesh, all_gather_slots
from cfgpar.distributed.sp_attention import KeyBlocks, sp_attention


def shard_positions(length: int, parts: int, part: int) -> torch.Tensor:
    """Positions, in a segment of `length` tokens, of shard `part` of `parts`: the segment padded
    to parts * ceil(length / parts) and cut in contiguous pieces; padding marked -1."""
    per = -(-length // parts)
    pos = torch.arange(part * per, (part + 1) * per)
    return torch.where(pos < length, pos, -1)


def shard_index(length: int, parts: int, part: int) -> torch.Tensor:
    """shard_positions with the padding repeating the segment's last token (length - 1)."""
    pos = shard_positions(length, parts, part)
    return torch.where(pos >= 0, pos, length - 1)


def check_ulysses_degree(heads: int, ulysses_degree: int) -> None:
    """Ulysses gives each rank heads / ulysses_degree whole heads."""
    if heads % ulysses_degree:
        raise ValueError(f"ulysses_degree={ulysses_degree} does not divide the model's {heads} attention heads; "
                         f"use a ulysses_degree that divides {heads} (or ring_degree for the rest).")


@dataclass(frozen=True)
class SequenceShards:
    """The loop's half: this rank's shard of a [B, L, C] token sequence, and back."""

    group: dist.ProcessGroup | None
    size: int
    rank: int

    @classmethod
    def of(cls, mesh: ParallelMesh) -> "SequenceShards":
        return cls(mesh.sp_group, mesh.sp_size, mesh.sp_rank)

    @classmethod
    def whole(cls) -> "SequenceShards":
        """No sharding: shard and gather return what they are given."""
        return cls(None, 1, 0)

    def shard(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [B, ceil(L / size), C]."""
        if self.size == 1:
            return tokens
        return tokens.index_select(1, shard_index(tokens.shape[1], self.size, self.rank).to(tokens.device))

    def gather(self, local: torch.Tensor, length: int) -> torch.Tensor:
        """Every rank's [B, ceil(L / size), C] -> the whole [B, L, C], on every rank of the group."""
        if self.size == 1:
            return local
        parts = all_gather_slots(local, self.group, self.size)  # [size, B, per, C]
        return parts.transpose(0, 1).flatten(1, 2)[:, :length]


# ---- the model's half ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    """Where this rank's tokens sit, for one set of segment lengths."""

    rows: torch.Tensor
    """[N] positions in the concatenated segments of this rank's tokens (padding repeats)."""
    blocks: KeyBlocks


def _layout(segments: tuple[int, ...], ulysses: int, ring: int, sp_rank: int, device) -> _Layout:
    parts, offsets = ulysses * ring, [0]
    for length in segments[:-1]:
        offsets.append(offsets[-1] + length)

    def positions(part: int) -> torch.Tensor:  # global positions of `part`'s tokens, -1 for padding
        return torch.cat([torch.where(p >= 0, p + o, -1) for p, o in
                          ((shard_positions(n, parts, part), o) for n, o in zip(segments, offsets))])

    keep, empty = [], []
    for block in range(ring):  # a ring block: the tokens of its `ulysses` ranks, gathered in rank order
        pos = torch.cat([positions(block * ulysses + u) for u in range(ulysses)])
        real = torch.nonzero(pos >= 0).flatten()
        order = real[torch.argsort(pos[real])]
        identity = len(order) == len(pos) and bool((order == torch.arange(len(pos))).all())
        keep.append(None if identity else order.to(device))
        empty.append(len(order) == 0)
    rows = torch.cat([shard_index(n, parts, sp_rank) + o for n, o in zip(segments, offsets)])
    return _Layout(rows.to(device), KeyBlocks(tuple(keep), tuple(empty)))


def parallelize(pipeline, mesh: ParallelMesh) -> None:
    """Apply this rank's sequence parallelism to the pipeline's transformer (no-op without SP)."""
    if mesh.sp_size == 1:
        return
    from diffusers import QwenImageTransformer2DModel, WanTransformer3DModel

    from cfgpar.distributed.sp_wan import WanSequenceParallel

    transformer = getattr(pipeline, "transformer", None)
    if isinstance(transformer, QwenImageTransformer2DModel):
        QwenImageSequenceParallel(transformer, mesh)
    elif isinstance(transformer, WanTransformer3DModel):
        for expert in (transformer, getattr(pipeline, "transformer_2", None)):
            if expert is not None:
                WanSequenceParallel(expert, mesh)
    else:
        raise ValueError("sequence parallelism (ulysses_degree, ring_degree > 1) supports QwenImageTransformer2DModel "
                         f"and WanTransformer3DModel; this model's transformer is {type(transformer).__name__}: use "
                         "ulysses_degree=ring_degree=1.")


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
        self._layouts: dict[tuple[int, ...], _Layout] = {}
        self.layout: _Layout | None = None
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
        if segments not in self._layouts:
            self._layouts[segments] = _layout(segments, self.groups.ulysses_size, self.groups.ring_size,
                                              self.mesh.sp_rank, hidden.device)
        self.layout = self._layouts[segments]
        if hidden.shape[1] != len(self.layout.rows):
            raise RuntimeError(f"sequence parallelism expected this rank's shard of {len(self.layout.rows)} image "
                               f"tokens (segments {segments}), got {hidden.shape[1]}.")

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
