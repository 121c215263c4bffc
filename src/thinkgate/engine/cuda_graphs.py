"""Decode steps as captured CUDA graphs.

A decode step of a small model is hundreds of short kernels; launched one by one from Python, the GPU
waits on the CPU most of the time. Captured once per batch-size bucket and replayed, the whole forward
(and the LM head) goes to the GPU as one launch. Everything a replay reads lives in fixed buffers that
each step overwrites: token ids, positions, cache slots, block tables and context lengths. Rows past the
real batch in a bucket point at a scratch cache block that no sequence owns, so they attend to one
harmless position and write their keys where nobody reads.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from thinkgate.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to max_batch (padding wastes at most 7 rows of a small step)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch + 1, 8))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
                 max_batch: int, max_blocks_per_seq: int, scratch_block: int):
        """`scratch_block`: a cache block outside the block manager's pool (padding rows write there)."""
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.buckets = batch_buckets(max_batch)
        self.max_blocks = max_blocks_per_seq
        self.scratch_block = scratch_block
        dev = kv_caches[0][0].device
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), scratch_block * block_size, dtype=torch.long, device=dev)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        # One host buffer for all five inputs, so a step costs one pinned copy instead of five.
        self._host = torch.empty(n * (4 + max_blocks_per_seq), dtype=torch.long)
        if dev.type == "cuda":
            self._host = self._host.pin_memory()
        self._host_np = self._host.numpy()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.captured = False

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata.paged_decode(self.slot_mapping[:bs], self.block_tables[:bs], self.context_lens[:bs])

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._meta(bs))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> float:
        t0 = time.perf_counter()
        pool = None
        for bs in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory pool
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (allocator, lazy kernel loading)
                self._forward(bs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = (graph, logits)
        torch.cuda.synchronize()
        self.captured = True
        took = time.perf_counter() - t0
        log.info("captured %d decode graphs (batch %s) in %.1f s", len(self.graphs), self.buckets, took)
        return took

    def bucket_for(self, batch: int) -> int | None:
        for b in self.buckets:
            if b >= batch:
                return b
        return None

    def run(self, ids: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One decode step for len(ids) sequences -> logits [B, V] (a view of the graph's output)."""
        b = len(ids)
        n = self.bucket_for(b)
        w = max(len(t) for t in tables)  # the kernel reads no column past a row's context: copy only these
        host = self._host_np[: n * (4 + w)]
        host[: 4 * n].reshape(4, n)[:] = ((0,), (0,), (self.scratch_block * self.block_size,), (1,))
        tab = host[4 * n:].reshape(n, w)
        tab[:] = self.scratch_block
        pos = np.asarray(positions, dtype=np.int64)
        host[:b] = ids
        host[n:n + b] = pos
        host[3 * n:3 * n + b] = pos + 1
        for i, t in enumerate(tables):
            tab[i, : len(t)] = t
        bsz = self.block_size
        host[2 * n:2 * n + b] = tab[np.arange(b), pos // bsz] * bsz + pos % bsz
        dev = self._host[: n * (4 + w)].to(self.input_ids.device, non_blocking=True)
        self.input_ids[:n].copy_(dev[:n])
        self.positions[:n].copy_(dev[n:2 * n])
        self.slot_mapping[:n].copy_(dev[2 * n:3 * n])
        self.context_lens[:n].copy_(dev[3 * n:4 * n])
        self.block_tables[:n, :w].copy_(dev[4 * n:].view(n, w))
        if not self.captured:  # the same fixed buffers, run eagerly (tests on CPU; --enforce-eager is simpler)
            return self._forward(n)[:b]
        graph, logits = self.graphs[n]
        graph.replay()
        return logits[:b]
