"""The synchronous engine core: add_request / step / abort."""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from thinkgate.config import EngineConfig
from thinkgate.engine.block_manager import BlockManager
from thinkgate.engine.detokenizer import IncrementalDetokenizer
from thinkgate.engine.kv_pool import cpu_pool_size, resolve_kv_dtype
from thinkgate.engine.model_runner import ModelRunner, triton_available
from thinkgate.engine.request import FinishReason, RequestOutput, Sequence, Status
from thinkgate.engine.scheduler import ScheduledBatch, Scheduler
from thinkgate.engine.speculative import NgramProposer
from thinkgate.engine.thinking import ThinkingTracker
from thinkgate.layers.cpu_fused import available as cpu_fused_available
from thinkgate.layers.ggml_linear import GGMLLinear
from thinkgate.layers.linear import QuantizedLinear
from thinkgate.layers.moe import grouped_mm_supported
from thinkgate.models.footprint import available_memory
from thinkgate.models.loader import LoadedModel, load_model
from thinkgate.models.resident import memory_report
from thinkgate.sampling.acceptance import accept_greedy, accept_sampled
from thinkgate.sampling.params import SamplingParams
from thinkgate.sampling.sampler import SamplingRow

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.loaded = loaded
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.eos_ids = set(loaded.eos_token_ids)
        model = loaded.model
        # The dtype attention computes in (fp32 for bf16 models on CPU); the pool's own dtype: see kv_pool.
        dtype = model.attn_backend.compute_dtype or model.norm.weight.dtype
        device = model.norm.weight.device
        cpu_kernels_run = device.type == "cpu" and config.cpu_kernels and cpu_fused_available()
        quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
        gguf_blocks = any(isinstance(m, GGMLLinear) for m in model.modules())
        kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, dtype, device.type, cpu_kernels_run, quantized,
                                    gguf_blocks)
        per_block = ModelRunner.kv_bytes_per_block(model.cfg, config.block_size, kv_dtype)
        num_blocks = self._num_blocks(per_block, device)
        ctx = config.max_model_len or model.cfg.max_position_embeddings
        self.max_model_len = min(ctx, num_blocks * config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, config.block_size, kv_dtype, self.tokenizer.vocab_size)
        if self.runner.device.type == "cuda" and triton_available():
            # Experts without a grouped matmul (fp32, pre-Hopper) sync with the host each layer: no capture.
            capturable = model.cfg.num_experts == 0 or grouped_mm_supported(self.runner.device, dtype)
            graphs = "capture" if capturable and not config.enforce_eager else "off"
            self.runner.enable_paged_decode(config.max_num_seqs, self.max_model_len, graphs)
        elif gguf_blocks and device.type == "cpu" and self.runner.enable_ggml_decoder(config.max_num_seqs):
            log.info("CPU decode steps in thinkgate's C++ layer loop over the GGUF's blocks")
        elif cpu_kernels_run and dtype == torch.float32 and kv_dtype == torch.float32:
            # Our C++ decode kernels (they read an fp32 pool).
            self.runner.enable_paged_decode(config.max_num_seqs, self.max_model_len, "off")
            log.info("CPU decode on thinkgate's C++ kernels (fused ops, paged attention%s)",
                     ", one-sequence steps in the C++ layer loop" if self.runner.cpu_decoder is not None else "")
        else:
            self.runner.use_reference_ops()
        self.seqs: dict[str, Sequence] = {}
        # Overlapped decode: on with CUDA graphs unless configured (see _step_overlapped).
        self.overlap = config.async_decode if config.async_decode is not None else self.runner.graphs is not None
        self._pending = None  # (batch, launched step) whose tokens the next step() accounts
        self.thinking = ThinkingTracker(self.tokenizer)
        if config.speculative not in ("off", "ngram"):
            raise ValueError(f"unknown speculative method {config.speculative!r}; choose off or ngram")
        # Speculation runs on the eager paths (CPU, GPU without graphs): graph replays and overlapped steps
        # are one-token decode steps.
        self.proposer = NgramProposer() if config.speculative == "ngram" and not self.overlap \
            and self.runner.graphs is None else None
        if config.speculative == "ngram" and self.proposer is None:
            log.warning("speculative decoding is off: it does not run with CUDA graphs or overlapped decode")
        log.info("KV cache: %d tokens (%d blocks of %d) in %s, %.1f MiB; max_model_len %d", num_blocks *
                 config.block_size, num_blocks, config.block_size, str(kv_dtype).removeprefix("torch."),
                 num_blocks * per_block / 2**20, self.max_model_len)
        if device.type == "cpu":
            log.info(memory_report(model, num_blocks * per_block))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        from thinkgate.models.default_model import resolve_model_spec

        loaded = load_model(resolve_model_spec(config.model), config.dtype, config.device, config.max_model_len,
                            config.weight_quant, config.head_quant, config.cpu_kernels, config.quantization)
        return cls(loaded, config)

    def _num_blocks(self, per_block: int, device: torch.device) -> int:
        cfg = self.config
        if device.type == "cuda":
            budget = cfg.kv_cache_memory
            if budget is None:
                free, _ = torch.cuda.mem_get_info(device)
                budget = int(free * 0.85)
            n = budget // per_block
        else:
            per_token = per_block // cfg.block_size
            size = cpu_pool_size(cfg.kv_cache_memory, cfg.max_model_len, cfg.max_num_seqs, per_token,
                                 available_memory("cpu"), cfg.block_size)
            if size.shrunk:
                log.warning("KV cache: %d tokens asked (%s) do not fit the memory available; the pool holds %d",
                            size.asked_tokens, size.source, size.tokens)
            else:
                log.info("KV cache sized by %s", size.source)
            budget, n = size.tokens * per_token, size.tokens // cfg.block_size
        if n < 2:
            raise ValueError(f"the KV cache budget ({budget} bytes) holds fewer than 2 blocks of {per_block} bytes")
        return int(n)

    # -- API --------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams, cache_salt: str = "",
                    reasoning_open: bool = False, grammar=None) -> None:
        self.submit(self.make_sequence(request_id, prompt_ids, params, cache_salt, reasoning_open, grammar))

    def submit(self, seq: Sequence) -> None:
        """Queue a prepared sequence (engine thread only)."""
        if seq.request_id in self.seqs:
            raise ValueError(f"duplicate request id {seq.request_id}")
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)

    def make_sequence(self, request_id: str, prompt_ids: list[int], params: SamplingParams, cache_salt: str = "",
                      reasoning_open: bool = False, grammar=None) -> Sequence:
        """Build a request's state; touches no shared state, so any thread may call it. Requests reach the
        engine validated (thinkgate.params, then the provider): what is checked here are the engine's own
        invariants, and a breach is a ValueError of the caller, not an API error."""
        if not prompt_ids or len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"a prompt needs 1..{self.max_model_len - 1} tokens (room to generate one), "
                             f"got {len(prompt_ids)}")
        params.check(self.tokenizer.vocab_size)
        room = self.max_model_len - len(prompt_ids)
        params = replace(params.resolved(self.loaded.generation_defaults),
                         max_tokens=room if params.max_tokens is None else min(params.max_tokens, room))
        seq = Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=params,
                       detok=IncrementalDetokenizer(self.tokenizer, params.stop), cache_salt=cache_salt,
                       in_reasoning=reasoning_open, grammar=grammar)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        if self.proposer is not None:
            self.proposer.forget(request_id)
        seq.finish_reason = FinishReason.ABORT
        return self._output(seq, [], [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or self._pending is not None

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Finish every request with an error (after an exception inside a step)."""
        outs = []
        self._pending = None
        for seq in list(self.seqs.values()):
            self.scheduler.finish(seq)
            seq.finish_reason, seq.stop_reason = FinishReason.ERROR, message
            outs.append(self._output(seq, [], None))
        self.seqs.clear()
        if self.proposer is not None:
            self.proposer.states.clear()
        return outs

    def step(self) -> list[RequestOutput]:
        if self._pending is not None:
            return self._step_overlapped()
        batch = self.scheduler.schedule(self._propose()) if self.proposer is not None else self.scheduler.schedule()
        if not batch.seqs:
            return []
        if batch.drafts:
            return self._run_speculative(batch)
        if self.overlap and self._can_overlap(batch):
            self._launch(batch)  # its tokens come back with the next step's call
            return []
        return self._run(batch)

    def _run(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """One step, synchronously: run the model, then account every sampled token."""
        rows: list[SamplingRow | None] = []
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            rows.append(self._sampling_row(seq) if seq.num_computed + n == seq.num_tokens else None)
        result = self.runner.execute(batch, rows)
        outputs, k = [], 0
        for seq, n, row in zip(batch.seqs, batch.num_new, rows, strict=True):
            seq.num_computed += n
            self.block_manager.register_full_blocks(seq)
            if row is None:
                continue
            token = result.token_ids[k]
            lp = (token, result.logprobs[k], result.top_logprobs[k]) if result.logprobs is not None else None
            k += 1
            outputs.append(self._append(seq, token, lp))
        return outputs

    # -- speculative decoding (engine/speculative.py) ---------------------------------------------
    def _speculates(self, seq: Sequence) -> bool:
        """What cannot be kept exact under speculation does not speculate: grammars (the matcher would have
        to advance over drafts and roll back), logprobs (reported per sampled position), forced tokens and
        thinking budgets (the engine rewrites tokens between steps)."""
        p = seq.params
        return (p.speculative and seq.grammar is None and not seq.forced and not p.logprobs
                and p.reasoning_budget is None and seq.num_computed + 1 == seq.num_tokens)

    def _propose(self) -> dict[str, list[int]]:
        drafts = {}
        for seq in self.scheduler.running:
            if not self._speculates(seq):
                continue
            # Room: the bonus token must still fit max_tokens, and every position the context.
            room = min(seq.params.max_tokens - len(seq.output_ids) - 1, self.max_model_len - seq.num_tokens)
            d = self.proposer.propose(seq.request_id, seq.all_ids, room)
            if d:
                drafts[seq.request_id] = d
        return drafts

    def _run_speculative(self, batch: ScheduledBatch) -> list[RequestOutput]:
        """A step where some sequences verify drafts: their pending token and drafts run as one chunk with
        logits at every position; the longest agreeing prefix plus one token is appended."""
        rows: list[SamplingRow | None] = []
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            rows.append(self._sampling_row(seq) if seq.num_computed + n >= seq.num_tokens else None)
        logits = self.runner.verify_logits(batch, rows)
        plain = [i for i, (r, d) in enumerate(zip(rows, batch.drafts, strict=True)) if r is not None and not d]
        sampled = {}
        if plain:
            res = self.runner.sampler(torch.cat([logits[i] for i in plain]), [rows[i] for i in plain])
            for j, i in enumerate(plain):
                lp = (res.token_ids[j], res.logprobs[j], res.top_logprobs[j]) if res.logprobs is not None else None
                sampled[i] = (res.token_ids[j], lp)
        outputs = []
        for i, (seq, n, row, d) in enumerate(zip(batch.seqs, batch.num_new, rows, batch.drafts, strict=True)):
            if not d:
                seq.num_computed += n
                self.block_manager.register_full_blocks(seq)
                if row is not None:
                    outputs.append(self._append(seq, *sampled[i]))
                continue
            tokens = self._accept(seq, logits[i], d)
            self.proposer.record(seq.request_id, len(d), len(tokens) - 1)
            outs = []
            for tok in tokens:  # token j sits after the pending token and j accepted drafts, all computed
                seq.num_computed += 1
                self.block_manager.register_full_blocks(seq)
                outs.append(self._append(seq, tok, None))
                if seq.finish_reason is not None:
                    break
            if seq.status != Status.FINISHED:
                self.block_manager.shrink(seq, seq.num_computed)  # the rejected drafts' blocks
            outputs.append(_merge(outs))
        return outputs

    def _accept(self, seq: Sequence, logits: torch.Tensor, drafts: list[int]) -> list[int]:
        rows = [self._sampling_row(seq, drafts[:j]) for j in range(len(drafts) + 1)]
        targets, probs = self.runner.sampler.targets(logits, rows)
        if targets is not None:
            return accept_greedy(targets, drafts)
        return accept_sampled(probs, drafts, seq.generator)

    # -- overlapped decode (GPU) ------------------------------------------------------------------
    # A decode step on a GPU is a graph replay of 1-3 ms, and the host's accounting of its tokens
    # (detokenizing, building outputs, handing them to the server) is a good part of that again. For plain
    # decode steps the next step does not depend on that text, only on the tokens and on whether a
    # sequence ended by EOS or length: so the next step is launched as soon as the tokens are known, and
    # the text work runs while the GPU computes. Outputs then come one step later than the tokens.
    def _can_overlap(self, batch: ScheduledBatch) -> bool:
        """Decode only, and nothing that makes the next step depend on this step's text or logprobs."""
        if not all(n == 1 for n in batch.num_new):
            return False
        for seq in batch.seqs:
            p = seq.params
            if (seq.num_computed + 1 != seq.num_tokens or seq.grammar is not None or seq.forced or p.stop
                    or p.logprobs or p.reasoning_budget is not None):
                return False
        return True

    def _launch(self, batch: ScheduledBatch) -> None:
        rows = [self._sampling_row(seq) for seq in batch.seqs]
        self._pending = (batch, self.runner.launch_decode(batch, rows))

    def _step_overlapped(self) -> list[RequestOutput]:
        batch, pending = self._pending
        self._pending = None
        tokens = pending.token_ids()  # waits for the GPU
        accounted = []
        for seq, token in zip(batch.seqs, tokens, strict=True):
            if self.seqs.get(seq.request_id) is not seq:  # aborted while the step ran: drop its token
                continue
            seq.num_computed += 1
            self.block_manager.register_full_blocks(seq)
            accounted.append((seq, *self._append_state(seq, token, None)))
        sync_batch = None
        nxt = self.scheduler.schedule()
        if nxt.seqs:
            if self.overlap and self._can_overlap(nxt):
                self._launch(nxt)
            else:
                sync_batch = nxt
        outputs = [self._append_text(seq, token, lp, add_text) for seq, token, lp, add_text in accounted]
        if sync_batch is not None:
            outputs.extend(self._run(sync_batch))
        return outputs

    # -- internals --------------------------------------------------------------------------------
    def _sampling_row(self, seq: Sequence, ahead: list[int] | None = None) -> SamplingRow:
        """`ahead`: draft tokens taken as already generated (the row of a position past the pending one)."""
        output_ids = seq.output_ids + ahead if ahead else seq.output_ids
        banned = None
        if len(output_ids) < seq.params.min_tokens:
            banned = sorted(self.eos_ids | set(seq.params.stop_token_ids))
        constrained = seq.grammar is not None and not seq.forced and not seq.in_reasoning
        mask = seq.grammar.allowed_mask() if constrained else None
        return SamplingRow(seq.params, seq.prompt_ids, output_ids, seq.generator, banned, mask)

    def _append(self, seq: Sequence, token: int, lp) -> RequestOutput:
        return self._append_text(seq, *self._append_state(seq, token, lp))

    def _append_state(self, seq: Sequence, token: int, lp) -> tuple[int, tuple | None, bool]:
        """Account a sampled token in everything the next step depends on (the token itself, reasoning
        and grammar state, and the ends that need no text: EOS, stop tokens and, for sequences without
        stop strings or grammars, the length). Returns (token, logprob entry, whether its text counts)."""
        p = seq.params
        self.thinking.enforce_budget(seq)
        forced = bool(seq.forced)
        if forced:
            token, lp = seq.forced.pop(0), None
        seq.output_ids.append(token)
        if lp is not None:  # the 4th field marks reasoning tokens (logprobs are reported for content only)
            seq.logprobs.append((*lp, self.thinking.is_reasoning(seq, token)))
        answer = self.thinking.advance(seq, token, forced)
        if answer and seq.grammar is not None and not forced and not seq.grammar.accept(token):
            seq.finish_reason, seq.stop_reason = FinishReason.ERROR, "the output left its grammar"
        add_text = False
        if seq.finish_reason is not None:
            pass
        elif token in self.eos_ids and not p.ignore_eos:
            seq.finish_reason = FinishReason.EOS
        elif token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = FinishReason.STOP_TOKEN, token
        else:
            add_text = True
            # Without stop strings or a grammar the text cannot end the sequence, so the length can be
            # checked now; otherwise it waits until they have had their say (they take precedence).
            if not p.stop and seq.grammar is None and self._at_length(seq):
                seq.finish_reason = FinishReason.LENGTH
        if seq.finish_reason is not None:
            self._finish(seq)
        return token, lp, add_text

    def _append_text(self, seq: Sequence, token: int, lp, add_text: bool) -> RequestOutput:
        """The token's text: stop strings, grammar completion and the length, then the output."""
        if add_text:
            stop = seq.detok.add(token)
            if seq.finish_reason is not None:
                pass
            elif stop is not None:
                seq.finish_reason, seq.stop_reason = FinishReason.STOP_SEQUENCE, stop
            elif seq.grammar is not None and not seq.in_reasoning and not seq.forced \
                    and seq.grammar.is_terminated():
                seq.finish_reason = FinishReason.GRAMMAR
            elif self._at_length(seq):
                seq.finish_reason = FinishReason.LENGTH
            if seq.finish_reason is not None and seq.status != Status.FINISHED:
                self._finish(seq)
        if seq.finish_reason is not None:
            seq.detok.flush()
        new_lp = [seq.logprobs[-1]] if lp is not None else None
        return self._output(seq, [token], new_lp)

    def _at_length(self, seq: Sequence) -> bool:
        return len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.seqs.pop(seq.request_id, None)
        if self.proposer is not None:
            self.proposer.forget(seq.request_id)

    def _output(self, seq: Sequence, new_ids: list[int], lp) -> RequestOutput:
        done = seq.status == Status.FINISHED
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=new_ids, text=seq.detok.take(final=done), finished=done,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, num_prompt_tokens=len(seq.prompt_ids),
            num_cached_tokens=seq.num_cached_prompt, num_output_tokens=len(seq.output_ids),
            num_reasoning_tokens=seq.reasoning_tokens, logprobs=lp,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Offline helper: run prompts to completion and return each one's output token ids."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{id(self)}-{i}-{os.urandom(4).hex()}" for i in range(len(prompts))]
        out: dict[str, list[int]] = {i: [] for i in ids}
        for rid, prompt, p in zip(ids, prompts, plist, strict=True):
            self.add_request(rid, prompt, p)
        while self.has_unfinished():
            for o in self.step():
                out[o.request_id].extend(o.new_token_ids)
        return [out[i] for i in ids]


def _merge(outs: list[RequestOutput]) -> RequestOutput:
    """One output for the tokens a speculative step appended to one request."""
    last = outs[-1]
    if len(outs) == 1:
        return last
    return replace(last, new_token_ids=[t for o in outs for t in o.new_token_ids], text="".join(o.text for o in outs))
