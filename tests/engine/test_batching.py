"""Continuous batching, chunked prefill, preemption and prefix caching change nothing in the outputs."""

import torch

from thinkgate.engine.request import FinishReason
from thinkgate.sampling.params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _prompts(vocab: int, lengths=(3, 17, 40, 9, 25, 60, 5, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_batched_equals_alone_with_chunked_prefill(engine_factory):
    eng = engine_factory("qwen3_moe", block_size=4, max_num_batched_tokens=16, enable_prefix_caching=False)
    prompts = _prompts(eng.tokenizer.vocab_size)
    alone = [eng.generate([p], GREEDY)[0] for p in prompts]
    together = eng.generate(prompts, GREEDY)
    assert together == alone
    eng.block_manager.check_integrity([])
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_preemption_keeps_outputs_identical(engine_factory):
    ref = engine_factory("qwen3", block_size=4, enable_prefix_caching=False)
    prompts = _prompts(ref.tokenizer.vocab_size)
    alone = [ref.generate([p], GREEDY)[0] for p in prompts]
    # 24 blocks of 4 tokens cannot hold 8 sequences of up to 84 tokens at once.
    small = engine_factory("qwen3", block_size=4, kv_cache_memory=24 * ref.runner.kv_bytes_per_block(
        ref.loaded.model.cfg, 4, torch.float32), enable_prefix_caching=True)
    assert small.block_manager.num_blocks == 24
    together = small.generate(prompts, GREEDY)
    assert small.scheduler.num_preemptions > 0
    assert together == alone
    small.block_manager.check_integrity([])
    assert small.block_manager.num_free_blocks == 24


def test_prefix_cache_reuses_shared_prefix(engine_factory):
    eng = engine_factory("qwen3", block_size=16)
    vocab = eng.tokenizer.vocab_size
    prefix = _prompts(vocab, (256,), seed=3)[0]
    a = prefix + _prompts(vocab, (10,), seed=4)[0]
    b = prefix + _prompts(vocab, (7,), seed=5)[0]
    outs = {}
    for rid, p in (("a", a), ("b", b)):
        eng.add_request(rid, p, GREEDY)
        while eng.has_unfinished():
            for o in eng.step():
                outs[o.request_id] = o
    assert outs["a"].num_cached_tokens == 0
    assert outs["b"].num_cached_tokens >= 240
    # Reuse must not change results: b alone on a fresh engine gives the same tokens.
    fresh = engine_factory("qwen3", block_size=16, enable_prefix_caching=False)
    assert fresh.generate([b], GREEDY)[0] == eng.generate([b], GREEDY)[0]


def test_prefix_cache_is_salted_per_tenant(engine_factory):
    eng = engine_factory("qwen3", block_size=16)
    p = _prompts(eng.tokenizer.vocab_size, (100,), seed=9)[0]
    cached = {}
    for rid, salt in (("x", "tenant-a"), ("y", "tenant-b"), ("z", "tenant-a")):
        eng.add_request(rid, p, GREEDY, cache_salt=salt)
        while eng.has_unfinished():
            for o in eng.step():
                cached[o.request_id] = o.num_cached_tokens
    assert cached == {"x": 0, "y": 0, "z": 96}


def test_integrity_after_aborts_preemptions_and_completions(engine_factory):
    probe = engine_factory("qwen3", block_size=4)
    per_block = probe.runner.kv_bytes_per_block(probe.loaded.model.cfg, 4, torch.float32)
    eng = engine_factory("qwen3", block_size=4, kv_cache_memory=30 * per_block, max_num_batched_tokens=32)
    prompts = _prompts(eng.tokenizer.vocab_size, (30, 20, 45, 8, 33, 12), seed=11)
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0.8, seed=i, max_tokens=30, ignore_eos=True))
    steps, finished = 0, {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o.finish_reason
        steps += 1
        live = eng.scheduler.running + list(eng.scheduler.waiting)
        eng.block_manager.check_integrity(live)
        if steps == 5:
            assert eng.abort("r2").finish_reason == FinishReason.ABORT
        if steps == 9:
            eng.abort("r4")
            eng.abort("does-not-exist")
    assert eng.scheduler.num_preemptions > 0
    assert set(finished) == {"r0", "r1", "r3", "r5"}
    eng.block_manager.check_integrity([])
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_stop_conditions_eos_and_max_tokens(engine_factory):
    eng = engine_factory("qwen2")
    prompt = _prompts(eng.tokenizer.vocab_size, (12,))[0]
    greedy = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert len(greedy) == 5
    # Make the 3rd greedy token a stop token id: generation ends right there.
    out = {}
    eng.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[greedy[2]]))
    while eng.has_unfinished():
        for o in eng.step():
            out.setdefault("ids", []).extend(o.new_token_ids)
            out["last"] = o
    assert out["ids"] == greedy[: greedy.index(greedy[2]) + 1]
    assert out["last"].finish_reason == FinishReason.STOP_TOKEN
    # An EOS id forced by logit_bias ends the request with reason eos.
    eos = eng.tokenizer.token_id("<|im_end|>")
    res = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=5, logit_bias={eos: 100}))[0]
    assert res == [eos]


def test_incremental_detokenizer_never_splits_utf8(engine_factory):
    from thinkgate.engine.detokenizer import IncrementalDetokenizer

    tok = engine_factory("qwen3").tokenizer
    text = "emoji 😀👍🏽 中文字符 mixed ✓ done"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok, stop=[])
    pieces = []
    for i in ids:
        d.add(i)
        piece = d.take(final=False)
        assert "\ufffd" not in piece
        pieces.append(piece)
    d.flush()
    pieces.append(d.take(final=True))
    assert "".join(pieces) == text


def _run_collect(eng, prompts, params, abort_at: dict | None = None):
    """Step to the end; each request's tokens, text, finish reason and usage (aborting some on the way)."""
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(f"q{i}", p, sp)
    res = {f"q{i}": {"ids": [], "text": "", "reason": None, "n_out": None} for i in range(len(prompts))}
    steps = 0
    while eng.has_unfinished():
        steps += 1
        for rid in (abort_at or {}).get(steps, []):
            eng.abort(rid)
        for o in eng.step():
            r = res[o.request_id]
            r["ids"] += o.new_token_ids
            r["text"] += o.text
            if o.finished:
                r["reason"], r["n_out"] = o.finish_reason, o.num_output_tokens
    return res


def test_overlapped_decode_changes_nothing(engine_factory):
    """With the text work of a step overlapped with the next step (the GPU default, forced on here), every
    request gets the same tokens, text, finish reason and usage as with synchronous steps: greedy and seeded
    sampling, stop strings and min_tokens (which fall back to synchronous steps), EOS and max_tokens."""
    vocab = engine_factory("qwen3").tokenizer.vocab_size
    prompts = _prompts(vocab, (5, 30, 12, 44, 9, 17), seed=21)
    params = [GREEDY, SamplingParams(temperature=0.9, seed=3, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40), SamplingParams(temperature=0, max_tokens=25, stop=["e"]),
              SamplingParams(temperature=0.7, seed=5, max_tokens=18, min_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)]
    sync = engine_factory("qwen3", block_size=4, enable_prefix_caching=False)
    over = engine_factory("qwen3", block_size=4, enable_prefix_caching=False, async_decode=True)
    assert over.overlap and not sync.overlap
    expected = _run_collect(sync, prompts, params)
    launched = []
    launch = over._launch
    over._launch = lambda batch: launched.append(len(batch.seqs)) or launch(batch)
    assert _run_collect(over, prompts, params) == expected
    assert len(launched) > 10  # most decode steps overlapped
    over.block_manager.check_integrity([])
    assert over.block_manager.num_free_blocks == over.block_manager.num_blocks


def test_overlapped_decode_with_aborts_and_preemption(engine_factory):
    probe = engine_factory("qwen3", block_size=4)
    per_block = probe.runner.kv_bytes_per_block(probe.loaded.model.cfg, 4, torch.float32)
    prompts = _prompts(probe.tokenizer.vocab_size, (30, 20, 45, 8, 33, 12), seed=11)
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * len(prompts)
    alone = {f"q{i}": probe.generate([p], params[0])[0] for i, p in enumerate(prompts)}
    eng = engine_factory("qwen3", block_size=4, kv_cache_memory=30 * per_block, max_num_batched_tokens=32,
                         async_decode=True)
    res = _run_collect(eng, prompts, params, abort_at={12: ["q1"], 20: ["q4"]})
    assert eng.scheduler.num_preemptions > 0
    for rid, r in res.items():
        if rid in ("q1", "q4"):
            assert r["reason"] is None and r["ids"] == alone[rid][: len(r["ids"])]  # cut short, no token lost
        else:
            assert r["ids"] == alone[rid] and r["n_out"] == 30
    eng.block_manager.check_integrity([])
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_chunked_prefill_never_stalls_running_decodes(engine_factory):
    """A long prompt arriving while sequences decode is prefilled in chunks beside them: every step of its
    prefill also advances each running decode by one token (a decode waits for at most one chunk's step)."""
    eng = engine_factory("qwen3", block_size=4, max_num_batched_tokens=16, enable_prefix_caching=False)
    short = _prompts(eng.tokenizer.vocab_size, lengths=(5, 9, 3), seed=1)
    long_prompt = _prompts(eng.tokenizer.vocab_size, lengths=(100,), seed=2)[0]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(short):
        eng.add_request(f"d{i}", p, params)
    eng.step()  # the three short prompts fit one step's budget: all three decode from now on
    batches = []
    schedule = eng.scheduler.schedule
    eng.scheduler.schedule = lambda: batches.append(schedule()) or batches[-1]
    eng.add_request("long", long_prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while eng.has_unfinished():
        eng.step()
    prefill_steps = [b for b in batches
                     if any(s.request_id == "long" and n > 1 for s, n in zip(b.seqs, b.num_new, strict=True))]
    assert len(prefill_steps) >= 100 // 16  # the prompt really was chunked
    for b in prefill_steps:
        rows = {s.request_id: n for s, n in zip(b.seqs, b.num_new, strict=True)}
        assert all(rows.get(f"d{i}") == 1 for i in range(3)), rows
        assert b.num_tokens <= 16
