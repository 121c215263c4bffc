"""Turns a scheduled batch into tensors, runs the model over the paged cache, samples the next tokens."""

from __future__ import annotations

import itertools

import torch

from thinkgate.engine.cuda_graphs import DecodeGraphs
from thinkgate.engine.scheduler import ScheduledBatch
from thinkgate.layers.attention import AttentionMetadata, TorchPagedAttention
from thinkgate.models.qwen import QwenForCausalLM, build_cpu_decoder
from thinkgate.sampling.sampler import Sampler, SampleResult, SamplingRow


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class ModelRunner:
    def __init__(self, model: QwenForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 valid_vocab: int):
        self.model = model
        cfg = model.cfg
        self.device = next(model.parameters()).device
        self.block_size = block_size
        self.num_blocks = num_blocks
        # One block past the block manager's pool: a scratch block for the padding rows of decode graphs.
        shape = (num_blocks + 1, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                           torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(cfg.num_layers)]
        self.sampler = Sampler(cfg.vocab_size, valid_vocab)
        self.paged_decode = False
        self.graphs: DecodeGraphs | None = None
        self.cpu_decoder = None  # csrc/decoder.cpp's Q4Decoder, for one-sequence CPU decode steps
        self.decoder_rows = 1  # decode steps of up to this many sequences go to cpu_decoder
        # cpu_decoder takes rows at any positions (csrc/ggml_decoder.cpp), so verify steps go there too, whatever
        # the batch size: a verify step is 1 + drafts rows even for one sequence.
        self.decoder_verifies = False
        # Mixed steps (prefills beside decodes) run as two: the decodes through cpu_decoder, the prefills through
        # the model (whose linears may then take a GEMM, layers/ggml_linear.GEMM_MIN_ROWS). A decoding
        # sequence's tokens are then the same whether or not another sequence was prefilling beside it.
        self.split_mixed = False

    def enable_ggml_decoder(self, max_batch: int) -> bool:
        """Decode steps (any batch) through csrc/ggml_decoder.cpp, for a model served from a GGUF's own blocks;
        False where some layer cannot run there."""
        from thinkgate.models.gguf_blocks import build_ggml_decoder

        decoder = build_ggml_decoder(self.model, self.kv_caches)
        if decoder is None:
            return False
        self.use_reference_ops()  # prefill and mixed steps: the model's own forward (the model may be shared)
        self.paged_decode = True
        self.cpu_decoder = decoder
        self.decoder_rows = max_batch
        self.decoder_verifies = True
        self.split_mixed = True
        return True

    def enable_paged_decode(self, max_batch: int, max_model_len: int, graphs: str = "capture",
                            fused: bool = True, kernels: str = "auto") -> None:
        """Decode through a paged-attention kernel that reads the cache in place, and (`fused`) norms,
        rotary + cache write and SwiGLU through fused ops. `kernels`: "triton", "cpu" (our C++ kernels) or
        "auto" (Triton on a GPU, C++ on a CPU). `graphs` (Triton only): "capture" (CUDA graphs), "eager"
        (the graphs' fixed buffers, no capture) or "off"."""
        backend = self.model.attn_backend
        if kernels == "cpu" or (kernels == "auto" and self.device.type == "cpu"):
            import thinkgate.layers.cpu_fused as ops

            self.model.attn_backend = ops.CpuPagedAttention(backend.scale, backend.compute_dtype)
            graphs = "off"
            # One sequence decoding: the whole layer stack in one C++ call, where every layer fits it.
            self.cpu_decoder = build_cpu_decoder(self.model, self.kv_caches) if fused else None
        else:
            import thinkgate.layers.triton_fused as ops
            from thinkgate.layers.triton_attention import TritonPagedAttention

            self.model.attn_backend = TritonPagedAttention(backend.scale, backend.compute_dtype)
        self.model.fused_ops = ops if fused else None
        self.paged_decode = True
        if graphs != "off":
            max_blocks = -(-max_model_len // self.block_size)
            self.graphs = DecodeGraphs(self.model, self.kv_caches, self.block_size, max_batch, max_blocks,
                                       scratch_block=self.num_blocks)
            if graphs == "capture":
                self.graphs.capture()

    def use_reference_ops(self) -> None:
        """Plain PyTorch ops and the reference attention (the model may be shared with an engine that
        enabled the fused path)."""
        backend = self.model.attn_backend
        self.model.attn_backend = TorchPagedAttention(backend.scale, backend.compute_dtype)
        self.model.fused_ops = None
        self.paged_decode = False
        self.graphs = None
        self.cpu_decoder = None
        self.decoder_rows = 1
        self.decoder_verifies = False
        self.split_mixed = False

    @staticmethod
    def kv_bytes_per_block(cfg, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, rows: list[SamplingRow | None]) -> SampleResult | None:
        """Run one step. `rows[i]` is None for a sequence whose prefill chunk does not reach its end."""
        logits = self._logits(batch, rows)
        return None if logits is None else self.sampler(logits, [r for r in rows if r is not None])

    @torch.inference_mode()
    def launch_decode(self, batch: ScheduledBatch, rows: list[SamplingRow]) -> PendingSample:
        """Start a decode step and its sampling without waiting for them (on a GPU the work is queued)."""
        return PendingSample(self.sampler.sample_ids(self._logits(batch, rows), rows))

    @torch.inference_mode()
    def verify_logits(self, batch: ScheduledBatch, rows: list[SamplingRow | None]) -> list[torch.Tensor | None]:
        """A step with speculative drafts: per sequence, None (no row), its last position's logits [1, V], or,
        with drafts, the logits at the pending token and at every draft [1 + len(drafts), V]."""
        counts = [0 if r is None else (len(d) + 1 if d else 1) for r, d in zip(rows, batch.drafts, strict=True)]
        logits = self._logits(batch, rows, counts)
        out, k = [], 0
        for c in counts:
            out.append(logits[k:k + c] if c else None)
            k += c
        return out

    def _logits(self, batch: ScheduledBatch, rows: list[SamplingRow | None],
                counts: list[int] | None = None) -> torch.Tensor | None:
        """Logits at each sampling sequence's last position, or (`counts`) at its last counts[i] positions."""
        if self.paged_decode and all(n == 1 for n in batch.num_new):
            return self._decode_logits(batch)
        if self.split_mixed:
            decoding = [len(s.all_ids) - s.num_computed == 1 for s in batch.seqs]
            if any(decoding) and not all(decoding):
                return self._split_logits(batch, rows, counts, decoding)
        if self.decoder_verifies and batch.drafts and any(batch.drafts) and \
                all(len(s.all_ids) - s.num_computed == 1 for s in batch.seqs):
            return self._verify_in_decoder(batch, counts)
        ids, pos, q_lens, kv_lens, tables = [], [], [], [], []
        drafts = batch.drafts or [[]] * len(batch.seqs)
        for seq, n, d in zip(batch.seqs, batch.num_new, drafts, strict=True):
            start = seq.num_computed
            ids.extend((seq.all_ids[start:] + d)[:n])
            pos.extend(range(start, start + n))
            q_lens.append(n)
            kv_lens.append(start + n)
            tables.append(seq.block_table)
        meta = AttentionMetadata.build(q_lens, kv_lens, tables, self.block_size, self.device,
                                       verify=any(drafts))
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)
        ends = itertools.accumulate(q_lens)
        if counts is None:
            counts = [0 if r is None else 1 for r in rows]
        want = [p for end, c in zip(ends, counts, strict=True) for p in range(end - c, end)]
        # Only the sampled rows' final hidden states are computed (the others' K/V are all later steps read).
        hidden = self.model(input_ids, positions, self.kv_caches, meta,
                            keep=torch.tensor(want, dtype=torch.long, device=self.device))  # [len(want), H]
        return self.model.compute_logits(hidden) if want else None  # [sum(counts), V]

    def _split_logits(self, batch: ScheduledBatch, rows: list[SamplingRow | None], counts: list[int] | None,
                      decoding: list[bool]) -> torch.Tensor | None:
        """A mixed step as two: the decoding sequences (with any drafts) through cpu_decoder, the others through
        the model; the logits put back in the batch's order."""
        drafts = batch.drafts or [[]] * len(batch.seqs)
        cs = counts if counts is not None else [0 if r is None else 1 for r in rows]
        parts = []
        for kind in (True, False):
            idx = [i for i, d in enumerate(decoding) if d == kind]
            sub = ScheduledBatch([batch.seqs[i] for i in idx], [batch.num_new[i] for i in idx],
                                 [drafts[i] for i in idx] if any(drafts[i] for i in idx) else [])
            sub_counts = [cs[i] for i in idx]  # the prefills' forward runs even where none samples (their K/V)
            logits = self._logits(sub, [rows[i] for i in idx], sub_counts if counts is not None else None)
            parts.append((idx, sub_counts, logits))
        pieces: list[torch.Tensor | None] = [None] * len(batch.seqs)
        for idx, sub_counts, logits in parts:
            k = 0
            for i, c in zip(idx, sub_counts, strict=True):
                if c:
                    pieces[i] = logits[k:k + c]
                    k += c
        out = [p for p in pieces if p is not None]
        return torch.cat(out) if out else None

    def _verify_in_decoder(self, batch: ScheduledBatch, counts: list[int] | None) -> torch.Tensor:
        """A step with drafts on decoding sequences, through the batched C++ decoder: each pending or draft
        token is a row of its own at its position, over its sequence's blocks (the decoder writes every row's
        K/V before any row attends, and a row attends up to its own position). Each row is then computed
        exactly as a one-token decode step at that position would compute it, so greedy answers with drafts
        are the answers without them."""
        ids, pos, tables = [], [], []
        for seq, n, d in zip(batch.seqs, batch.num_new, batch.drafts, strict=True):
            start = seq.num_computed
            ids.extend(([seq.all_ids[start]] + d)[:n])
            pos.extend(range(start, start + n))
            tables.extend([seq.block_table] * n)
        ends = list(itertools.accumulate(batch.num_new))
        cs = counts if counts is not None else [1] * len(batch.seqs)
        want = [p for end, c in zip(ends, cs, strict=True) for p in range(end - c, end)]
        bs = self.block_size
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        slots = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, pos, strict=True)])
        hidden = self.cpu_decoder.forward(self.model.embed_tokens(torch.tensor(ids)), torch.tensor(pos), slots,
                                          table, torch.tensor(pos, dtype=torch.int32).add_(1))
        return self.model.compute_logits(hidden[torch.tensor(want)])

    def _decode_logits(self, batch: ScheduledBatch) -> torch.Tensor:
        """A decode-only step through the paged kernel: a graph replay when the batch fits a bucket.
        Every row of a decode step ends its sequence's known tokens, so every row samples."""
        ids = [seq.all_ids[seq.num_computed] for seq in batch.seqs]
        pos = [seq.num_computed for seq in batch.seqs]
        tables = [seq.block_table for seq in batch.seqs]
        if self.graphs is not None and self.graphs.bucket_for(len(ids)) is not None:
            return self.graphs.run(ids, pos, tables)
        bs, dev = self.block_size, self.device
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        slots = torch.tensor([t[p // bs] * bs + p % bs for t, p in zip(tables, pos, strict=True)])
        meta = AttentionMetadata.paged_decode(slots.to(dev), table.to(dev),
                                              torch.tensor(pos, dtype=torch.int32).add_(1).to(dev))
        input_ids, positions = torch.tensor(ids, device=dev), torch.tensor(pos, device=dev)
        if self.cpu_decoder is not None and len(ids) <= self.decoder_rows:
            hidden = self.cpu_decoder.forward(self.model.embed_tokens(input_ids), positions, meta.slot_mapping,
                                              meta.block_tables, meta.context_lens)
            return self.model.compute_logits(hidden)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden)


class PendingSample:
    """Sampled token ids still on their way (a device tensor until asked for)."""

    def __init__(self, ids: torch.Tensor):
        self._ids = ids

    def token_ids(self) -> list[int]:
        return self._ids.tolist()
