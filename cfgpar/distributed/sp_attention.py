"""Joint text + image attention over a sequence-parallel group: Ulysses all-to-alls, then ring.

Shapes: B batch, H heads, D head dim, S text tokens, N this rank's image tokens (a padded
shard), U the Ulysses degree, R the ring degree, h = H / U.

Text tokens are replicated on every rank of the group: a prompt's length is arbitrary and short
next to the image (tens to hundreds of tokens against thousands), replicating it needs no
padding, and the text stream's per-token layers are cheap. Every query then attends to every
text key exactly once (in ring block 0) and to every real image key exactly once; padded image
keys are dropped, never masked, so padding cannot leak into the softmax.

1. Ulysses: image q, k, v [B, N, H, D] -> all-to-all -> [B, U*N, h, D] (the image tokens of the
   U ranks of this rank's ring block, this rank's h heads); text q, k, v keep their own h heads.
2. Ring: the R blocks' image keys and values travel around the ring (send to the next, receive
   from the previous, the next exchange in flight while this block is computed); each block
   gives a partial attention and its log-sum-exp. The partials merge in block order 0..R-1 on
   every rank, whichever arrived first, so text queries (computed on every ring rank) come out
   the same everywhere. With R = 1 this is one plain scaled_dot_product_attention call.
3. Back: the image part all-to-all'd to [B, N, H, D]; the text part all-gathered over heads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cfgpar.distributed.mesh import SequenceGroups, all_gather_slots


@dataclass(frozen=True)
class KeyBlocks:
    """Which gathered image keys each ring block keeps, in the order the attention sums them.

    keep[j]: indices into block j's U*N gathered tokens of its real (not padding) tokens, sorted
    by position in the image; None when that is all of them, in order (no copy needed)."""

    keep: tuple[torch.Tensor | None, ...]
    empty: tuple[bool, ...]
    """Blocks without a single real token (possible only when the padding is most of a shard)."""


def sp_attention(q_txt, k_txt, v_txt, q_img, k_img, v_img, blocks: KeyBlocks, groups: SequenceGroups):
    """Text [B, S, H, D] and image [B, N, H, D] q, k, v -> attention outputs, text [B, S, H, D]
    and image [B, N, H, D] (padded image queries give values the caller drops: zeros at ring 1)."""
    u = groups.ulysses_size
    start = time.perf_counter()
    q_img, k_img, v_img = _seq_to_heads(torch.stack([q_img, k_img, v_img]), groups)
    groups.exchange_s += time.perf_counter() - start
    h = q_txt.shape[2] // u
    heads = slice(groups.ulysses_rank * h, (groups.ulysses_rank + 1) * h)
    q_txt, k_txt, v_txt = (x[:, :, heads] for x in (q_txt, k_txt, v_txt))
    s = q_txt.shape[1]
    if groups.ring_size == 1:
        # Padded queries are dropped as the keys are: the attention then sees one rank's query
        # rows (text, then image by position), so its blocked matrix products have one rank's
        # shapes; a row's rounding can depend on its block's size (MKL under AVX2 does).
        keep = blocks.keep[0]
        query = torch.cat([q_txt, _kept(q_img, keep)], dim=1)
        out = _attend(query, torch.cat([k_txt, _kept(k_img, keep)], dim=1), torch.cat([v_txt, _kept(v_img, keep)], dim=1))
        out_txt, out_img = out[:, :s], _unkept(out[:, s:], keep, q_img.shape[1])
    else:
        out = _ring(torch.cat([q_txt, q_img], dim=1), k_txt, v_txt, k_img, v_img, blocks, groups)
        out_txt, out_img = out[:, :s], out[:, s:]
    start = time.perf_counter()
    txt, img = _gather_heads(out_txt, groups), _heads_to_seq(out_img, groups)
    groups.exchange_s += time.perf_counter() - start
    return txt, img


def _kept(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return x if keep is None else x.index_select(1, keep)


def _unkept(x: torch.Tensor, keep: torch.Tensor | None, length: int) -> torch.Tensor:
    """[B, len(keep), h, D] -> [B, length, h, D], zeros in the padding rows (their caller drops them)."""
    if keep is None:
        return x
    return x.new_zeros(x.shape[0], length, *x.shape[2:]).index_copy_(1, keep, x)


def _attend(query, key, value) -> torch.Tensor:
    """[B, L, h, D] in, [B, Lq, h, D] out: the call diffusers' native attention backend makes."""
    out = F.scaled_dot_product_attention(query.permute(0, 2, 1, 3), key.permute(0, 2, 1, 3), value.permute(0, 2, 1, 3))
    return out.permute(0, 2, 1, 3)


def _attend_lse(query, key, value) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L, h, D] in; ([B, h, Lq, D] output, [B, h, Lq] fp32 log-sum-exp of the scores)."""
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)[:2]
    return out, lse[..., : q.shape[2]].float()  # CUDA pads the lse's length to its tile


def _ring(query, k_txt, v_txt, k_img, v_img, blocks: KeyBlocks, groups: SequenceGroups) -> torch.Tensor:
    r, rank = groups.ring_size, groups.ring_rank
    partials: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    kv = torch.stack([k_img, v_img]).contiguous()
    for step in range(r):
        j = (rank - step) % r  # the block held at this step: our own first, then the previous rank's, ...
        pending = _pass_on(kv, groups) if step < r - 1 else None
        if j == 0 or not blocks.empty[j]:
            k, v = _kept(kv[0], blocks.keep[j]), _kept(kv[1], blocks.keep[j])
            if j == 0:
                k, v = torch.cat([k_txt, k], dim=1), torch.cat([v_txt, v], dim=1)
            partials[j] = _attend_lse(query, k, v)
        if pending is not None:
            start = time.perf_counter()
            kv = pending()
            groups.exchange_s += time.perf_counter() - start
    out, lse = partials[0]
    out = out.float()
    for j in range(1, r):
        if j in partials:
            out, lse = _merge(out, lse, *partials[j])
    return out.to(query.dtype).permute(0, 2, 1, 3)


def _merge(out_a, lse_a, out_b, lse_b):
    """Two partial attentions over disjoint keys -> the attention over their union (fp32)."""
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a * torch.exp(lse_a - lse).unsqueeze(-1) + out_b.float() * torch.exp(lse_b - lse).unsqueeze(-1)
    return out, lse


def _pass_on(kv: torch.Tensor, groups: SequenceGroups):
    """Send `kv` to the next ring rank and receive the previous one's; returns a wait() -> tensor."""
    r, rank = groups.ring_size, groups.ring_rank
    received = torch.empty_like(kv)
    ops = [dist.P2POp(dist.isend, kv, dist.get_global_rank(groups.ring, (rank + 1) % r), groups.ring),
           dist.P2POp(dist.irecv, received, dist.get_global_rank(groups.ring, (rank - 1) % r), groups.ring)]
    works = dist.batch_isend_irecv(ops)

    def wait() -> torch.Tensor:
        for work in works:
            work.wait()
        return received

    return wait


def _seq_to_heads(qkv: torch.Tensor, groups: SequenceGroups):
    """[3, B, N, H, D] -> three [B, U*N, h, D]: gather the sequence, scatter the heads."""
    u = groups.ulysses_size
    if u == 1:
        return qkv.unbind(0)
    three, b, n, heads, d = qkv.shape
    send = qkv.view(three, b, n, u, heads // u, d).permute(3, 0, 1, 2, 4, 5).contiguous()
    recv = torch.empty_like(send)  # [U, 3, B, N, h, D]: recv[p] is rank p's tokens, our heads
    dist.all_to_all_single(recv, send, group=groups.ulysses)
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(three, b, u * n, heads // u, d).unbind(0)


def _heads_to_seq(x: torch.Tensor, groups: SequenceGroups) -> torch.Tensor:
    """[B, U*N, h, D] -> [B, N, H, D]: the inverse of _seq_to_heads."""
    u = groups.ulysses_size
    if u == 1:
        return x
    b, un, h, d = x.shape
    send = x.reshape(b, u, un // u, h, d).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)  # [U, B, N, h, D]: recv[p] is our tokens, rank p's heads
    dist.all_to_all_single(recv, send, group=groups.ulysses)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, un // u, u * h, d)


def _gather_heads(x: torch.Tensor, groups: SequenceGroups) -> torch.Tensor:
    """Text output [B, S, h, D] -> [B, S, H, D], the same on every Ulysses rank."""
    u = groups.ulysses_size
    if u == 1:
        return x
    if x.shape[1] == 0:  # no text (Wan's self-attention): nothing to gather
        return x.new_empty(*x.shape[:2], u * x.shape[2], x.shape[3])
    out = all_gather_slots(x, groups.ulysses, u)  # [U, B, S, h, D]
    return out.permute(1, 2, 0, 3, 4).reshape(*x.shape[:2], u * x.shape[2], x.shape[3])
