"""The token embedding held as int8 rows (one scale a row) when the linears are quantized on CPU.

A lookup reads a few rows per step, so keeping the whole vocabulary in the float dtype (544 MiB in fp32 for a
151,936 x 896 table) buys nothing: the rows are dequantized as they are looked up. Where the output head is the
same tensor (tied embeddings) it multiplies with these same int8 rows, so the weight is held once.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor, out_dtype: torch.dtype):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)  # [V] symmetric per row
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale)
        self.out_dtype = out_dtype
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.qweight.index_select(0, flat).float() * self.scales.index_select(0, flat)[:, None]
        return rows.view(*ids.shape, self.embedding_dim).to(self.out_dtype)


class TiedInt8Head(nn.Module):
    """The output head of a model with tied embeddings: logits from the embedding's own int8 rows."""

    def __init__(self, embedding: Int8Embedding):
        super().__init__()
        self.embedding = embedding
        self._scales = embedding.scales.to(torch.bfloat16)  # the kernel's scale dtype (V x 2 bytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), e.qweight, self._scales).to(x.dtype)


def quantize_embedding(model: nn.Module) -> None:
    """Swap `model.embed_tokens` for its int8 form; a head tied to it then reads the same rows. Call it before
    quantize_linears, which would otherwise give a tied head a copy of its own."""
    emb = model.embed_tokens
    # load_state_dict(assign=True) gives the two modules separate Parameters over one tensor: compare storage.
    tied = isinstance(model.lm_head, nn.Linear) and model.lm_head.weight.data_ptr() == emb.weight.data_ptr()
    q = Int8Embedding(emb.weight, emb.weight.dtype)
    model.embed_tokens = q
    if tied:
        model.lm_head = TiedInt8Head(q)
