"""Turns a scheduled batch into tensors, runs the model over the paged cache, samples the next tokens."""

from __future__ import annotations

import torch

from thinkgate.engine.scheduler import ScheduledBatch
from thinkgate.layers.attention import AttentionMetadata
from thinkgate.models.qwen import QwenForCausalLM
from thinkgate.sampling.sampler import Sampler, SampleResult, SamplingRow


class ModelRunner:
    def __init__(self, model: QwenForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 valid_vocab: int):
        self.model = model
        cfg = model.cfg
        self.device = next(model.parameters()).device
        self.block_size = block_size
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                           torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(cfg.num_layers)]
        self.sampler = Sampler(cfg.vocab_size, valid_vocab)

    @staticmethod
    def kv_bytes_per_block(cfg, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, rows: list[SamplingRow | None]) -> SampleResult | None:
        """Run one step. `rows[i]` is None for a sequence whose prefill chunk does not reach its end."""
        ids, pos, q_lens, kv_lens, tables = [], [], [], [], []
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            start = seq.num_computed
            ids.extend(seq.all_ids[start:start + n])
            pos.extend(range(start, start + n))
            q_lens.append(n)
            kv_lens.append(start + n)
            tables.append(seq.block_table)
        meta = AttentionMetadata.build(q_lens, kv_lens, tables, self.block_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [T, H]
        last = torch.tensor(q_lens).cumsum(0) - 1
        want = [i for i, r in enumerate(rows) if r is not None]
        if not want:
            return None
        logits = self.model.compute_logits(hidden[last[want].to(self.device)])  # [B', V]
        return self.sampler(logits, [rows[i] for i in want])
