"""Attention over the paged KV cache.

The cache of one layer is a pair of tensors [num_blocks, block_size, Hkv, D]. A step's tokens are written
into their slots first, then every query attends to its sequence's whole context, gathered through the
block table. `TorchPagedAttention` is the reference backend (any device); a faster backend only has to
implement `forward(q, k_cache, v_cache, meta)` with the same meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step indexing shared by all layers (built once by the model runner)."""

    slot_mapping: torch.Tensor  # [T] flat cache slot of each new token
    kv_slots: torch.Tensor | None = None  # [B, Lmax] flat cache slot of each context position (padded)
    q_index: torch.Tensor | None = None  # [B, Qmax] index into the flat token axis (padded with 0)
    q_valid: torch.Tensor | None = None  # [B, Qmax] bool
    mask: torch.Tensor | None = None  # [B, 1, Qmax, Lmax] bool, True = may attend
    token_batch: torch.Tensor | None = None  # [T] row in the padded layout of each flat token
    token_pos: torch.Tensor | None = None  # [T] column in the padded layout
    # "decode" (one query per sequence), "fresh" (one prompt, empty cache), "chunk" (a prompt's later chunk),
    # "verify" (one sequence's pending token and its drafts) or "mixed"
    kind: str = "mixed"
    # Decode as a paged kernel sees it (no gathered copy): block table rows and context lengths, int32.
    block_tables: torch.Tensor | None = None  # [B, M]
    context_lens: torch.Tensor | None = None  # [B]

    @classmethod
    def paged_decode(cls, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor) -> AttentionMetadata:
        """Decode metadata over fixed-shape tensors (what a captured CUDA graph reads at every replay)."""
        return cls(slot_mapping=slot_mapping, kind="decode", block_tables=block_tables, context_lens=context_lens)

    @classmethod
    def build(cls, q_lens: list[int], kv_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device, verify: bool = False) -> AttentionMetadata:
        b = len(q_lens)
        qmax, lmax = max(q_lens), max(kv_lens)
        # "chunk": one sequence's prompt chunk after earlier chunks; causal from the bottom right, no mask.
        kind = "decode" if qmax == 1 else ("mixed" if b > 1 else "fresh" if q_lens[0] == kv_lens[0] else "chunk")
        if verify and kind == "chunk":
            # One sequence's pending token and its drafts: each query attends exactly as a one-token decode
            # step at its position would (TorchPagedAttention), so greedy output is the same with drafts.
            kind = "verify"
        nblk = max(len(t) for t in block_tables)
        table = torch.zeros((b, nblk), dtype=torch.long)
        for i, t in enumerate(block_tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        q_lens_t = torch.tensor(q_lens, dtype=torch.long)
        kv_lens_t = torch.tensor(kv_lens, dtype=torch.long)
        pos = torch.arange(lmax)
        kv_slots = table[:, pos // block_size] * block_size + pos % block_size  # [B, Lmax]
        starts = torch.cumsum(q_lens_t, 0) - q_lens_t
        qi = torch.arange(qmax)
        q_valid = qi[None, :] < q_lens_t[:, None]  # [B, Qmax]
        q_index = torch.where(q_valid, starts[:, None] + qi[None, :], torch.zeros_like(q_valid, dtype=torch.long))
        # Query i of sequence b sits at absolute position (kv_len - q_len + i) and sees keys up to it.
        qpos = (kv_lens_t - q_lens_t)[:, None] + qi[None, :]  # [B, Qmax]
        mask = None
        # Built where it is used ([B, Qmax, Lmax] is large for long chunks). A single prompt's later chunk
        # needs none: a bottom-right causal bias on CUDA, two unmasked calls on CPU (chunk_attention_cpu).
        if kind in ("mixed", "decode"):  # "verify", "chunk": none
            dpos, dq, dkv, dvalid = pos.to(device), qpos.to(device), kv_lens_t.to(device), q_valid.to(device)
            mask = (dpos[None, None, :] <= dq[:, :, None]) & (dpos[None, None, :] < dkv[:, None, None])
            mask = mask | (~dvalid)[:, :, None] & (dpos[None, None, :] == 0)  # padded rows: one key, no NaN
            mask = mask[:, None]
        slot_mapping = kv_slots.gather(1, torch.clamp(qpos, max=lmax - 1))[q_valid]
        token_batch = torch.repeat_interleave(torch.arange(b), q_lens_t)
        token_pos = torch.cat([torch.arange(n) for n in q_lens])
        return cls(
            slot_mapping=slot_mapping.to(device), kv_slots=kv_slots.to(device), q_index=q_index.to(device),
            q_valid=q_valid.to(device), mask=mask, token_batch=token_batch.to(device),
            token_pos=token_pos.to(device), kind=kind,
        )


class TorchPagedAttention:
    """Reference paged attention: gather the context, then SDPA with a causal-with-offset mask."""

    def __init__(self, scale: float, compute_dtype: torch.dtype | None = None):
        self.scale = scale
        # bf16 SDPA is slow for short queries on CPU (see deps-measured); fp32 is exact and faster there.
        self.compute_dtype = compute_dtype

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, k_new: torch.Tensor | None = None,
                v_new: torch.Tensor | None = None) -> torch.Tensor:
        # q: [T, Hq, D]; caches: [N, bs, Hkv, D]; k_new/v_new: this step's keys/values [T, Hkv, D]
        t = q.shape[0]
        dtype = self.compute_dtype or q.dtype
        if meta.kind == "fresh" and k_new is not None:
            # A whole prompt on an empty cache: plain causal attention over the new keys, no gather.
            out = sdpa(q.to(dtype).transpose(0, 1)[None], k_new.to(dtype).transpose(0, 1)[None],
                       v_new.to(dtype).transpose(0, 1)[None], scale=self.scale, is_causal=True)  # [1, Hq, T, D]
            return out[0].transpose(0, 1).to(q.dtype)
        if meta.kind == "decode":
            # One query per sequence: no query padding; a mask only when context lengths differ.
            k, v = gather_kv(k_cache, v_cache, meta.kv_slots, dtype)  # [B, Lmax, Hkv, D]
            mask = None if t == 1 else meta.mask
            out = sdpa(q.to(dtype).unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale,
                       attn_mask=mask)  # [B, Hq, 1, D]
            return out.squeeze(2).to(q.dtype)
        k, v = gather_kv(k_cache, v_cache, meta.kv_slots, dtype)  # [B, Lmax, Hkv, D]
        if meta.kind == "verify":
            # Query i (of t) sees the first L - t + i + 1 keys: one unmasked SDPA per query over exactly those,
            # the call a decode step makes at that position (same shapes, same kernel, the same sums), where
            # one masked call over all t queries sums in another order and can flip a greedy near-tie.
            n0 = k.shape[1] - t + 1
            rows = [sdpa(q[i:i + 1].to(dtype).unsqueeze(2), k[:, :n0 + i].transpose(1, 2),
                         v[:, :n0 + i].transpose(1, 2), scale=self.scale) for i in range(t)]
            return torch.cat(rows).squeeze(2).to(q.dtype)  # [t, Hq, D]
        if meta.kind == "chunk":
            q4 = q.to(dtype).transpose(0, 1)[None]  # [1, Hq, T, D]
            if not q.is_cuda:
                out = chunk_attention_cpu(q4, k.transpose(1, 2), v.transpose(1, 2), self.scale)
                return out[0].transpose(0, 1).to(q.dtype)
            mask = meta.mask
            if mask is None:
                # Imported here: torch.nn.attention.bias pulls in torch._dynamo (sympy, triton), ~140 MiB of
                # resident memory that a server which never prefills in chunks would carry for nothing.
                from torch.nn.attention.bias import causal_lower_right

                # Query i sits at position L - T + i: causal aligned at the bottom right, which SDPA's fused
                # kernels take without a materialised [T, L] mask.
                mask = causal_lower_right(t, k.shape[1])
            out = sdpa(q4, k.transpose(1, 2), v.transpose(1, 2), scale=self.scale, attn_mask=mask)  # [1, Hq, T, D]
            return out[0].transpose(0, 1).to(q.dtype)
        qp = q[meta.q_index].to(dtype)  # [B, Qmax, Hq, D]
        out = sdpa(qp.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale,
                   attn_mask=meta.mask)  # [B, Hq, Qmax, D]
        out = out.transpose(1, 2)[meta.token_batch, meta.token_pos]  # [T, Hq, D]
        return out.to(q.dtype)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attn_mask=None,
         is_causal: bool = False) -> torch.Tensor:
    """SDPA over [B, H, L, D] tensors with fewer KV heads than query heads (GQA).

    On CUDA the fused kernels (flash, memory-efficient) take only 4-D inputs and, with a mask or GQA, not
    every combination: anything else falls back to the math kernel, which materialises fp32 scores of
    [B, H, Q, L] (32 GiB for one 8K chunk of a 32K prompt, as the first GPU round-2 run found). So the KV
    heads are repeated there (a small copy beside prefill's work); on CPU `enable_gqa` is kept."""
    hq, hkv = q.shape[1], k.shape[1]
    if q.is_cuda and hq != hkv:
        k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=hq != hkv)


def chunk_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """A prompt's later chunk on CPU: q [1, Hq, T, D] at positions L - T .. L - 1 over k, v [1, Hkv, L, D].

    SDPA with the bottom-right causal mask is a masked call on CPU: it computes (and masks) every query-key
    pair, the chunk's upper triangle included, and reads the [T, L] mask besides (364 ms a layer for 2,048
    queries over 4,096 keys here). Split instead into the two parts flash attention takes unmasked: the
    earlier keys (all visible) and the chunk's own keys (causal from the top left), each returning its
    log-sum-exp, and combine them as one softmax would (257 ms; 834 -> 560 ms at 8,192 keys)."""
    t, n = q.shape[2], k.shape[2]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # GQA-aware; returns (out, lse)
    out_own, lse_own = flash(q, k[:, :, n - t:], v[:, :, n - t:], 0.0, True, scale=scale)[:2]
    if n == t:
        return out_own
    out_old, lse_old = flash(q, k[:, :, :n - t], v[:, :, :n - t], 0.0, False, scale=scale)[:2]
    top = torch.maximum(lse_own, lse_old)
    w_own, w_old = torch.exp(lse_own - top).unsqueeze(-1), torch.exp(lse_old - top).unsqueeze(-1)
    out = (out_own.float() * w_own + out_old.float() * w_old) / (w_own + w_old)
    return out.to(q.dtype)


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, kv_slots: torch.Tensor,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's context, gathered through its slots: [B, Lmax, Hkv, D]."""
    # index_select on the flat slot list is ~4x cheaper on CPU than advanced indexing with a 2-D index.
    b, lmax = kv_slots.shape
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    flat = kv_slots.reshape(-1)
    k = torch.index_select(k_cache.view(-1, hkv, d), 0, flat).view(b, lmax, hkv, d)
    v = torch.index_select(v_cache.view(-1, hkv, d), 0, flat).view(b, lmax, hkv, d)
    return k.to(dtype), v.to(dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values ([T, Hkv, D]) into their cache slots."""
    hkv, d = k.shape[1], k.shape[2]
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
