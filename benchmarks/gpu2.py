"""The GPU benchmark, second round (issue 20), one prepared script run by benchmarks/gpu.sh on a lent H100/H200.

Every figure is set against its physical floor measured on the same card: the bytes a step must read over
the card's measured copy bandwidth (decode), or 2 x parameters x tokens plus the attention's products over
its measured bf16 matmul rate (prefill). Random weights in real shapes built in device memory, greedy,
`thinkgate bench engine`'s loop (the whole engine: scheduling, sampling, detokenizing). Results go to
$OUT/gpu2_results.json as they come, the long-context plot to $OUT/long_context.png.

Parts (arguments; default all): env, long, prefill, moe, fp8, hf-moe.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import replay_ms  # noqa: E402 - the first round's script, beside this one

OUT = os.environ.get("OUT", ".")
R: dict = {}
T0 = time.time()


def save():
    with open(os.path.join(OUT, "gpu2_results.json"), "w") as f:
        json.dump(R, f, indent=1, default=str)


def say(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def ceilings():
    """Copy bandwidth (bytes read + written, 4 GiB buffers) and bf16 matmul rate (8192^3), medians of 10."""
    a = torch.empty(2**31, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    times = []
    for _ in range(13):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    bw = 2 * a.numel() / statistics.median(times[3:])
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(13):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        x @ y
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    rate = 2 * 8192**3 / statistics.median(times[3:])
    del x, y
    torch.cuda.empty_cache()
    R["env"] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "sms": torch.cuda.get_device_properties(0).multi_processor_count,
                "copy_bw_Bps": bw, "bf16_flops": rate}
    import triton

    R["env"]["triton"] = triton.__version__
    say(f"ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {rate / 1e12:.0f} TFLOP/s")
    save()


def engine(spec: str, max_num_seqs: int, max_model_len: int, kv_gib: float, batched_tokens: int = 8192, **kw):
    from thinkgate.config import EngineConfig
    from thinkgate.engine.llm_engine import LLMEngine

    t = time.time()
    eng = LLMEngine.from_config(EngineConfig(model=spec, dtype="bfloat16", device="cuda", max_num_seqs=max_num_seqs,
                                             enable_prefix_caching=False, max_model_len=max_model_len,
                                             max_num_batched_tokens=batched_tokens,
                                             kv_cache_memory=int(kv_gib * 2**30), **kw))
    torch.cuda.synchronize()
    say(f"{spec} {kw or ''}: start-up {time.time() - t:.1f} s")
    return eng


def weight_bytes(model) -> dict:
    """Bytes of the weights a decode step reads: every parameter and buffer except the embedding table
    (only B rows of it are read) unless it is tied to the head; experts apart."""
    total, experts = 0, 0
    seen = set()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or t.device.type != "cuda":
            continue
        seen.add(id(t))
        n = t.numel() * t.element_size()
        if name == "embed_tokens.weight" and model.lm_head.weight is not t:
            continue
        if name.endswith((".w13", ".w2")):
            experts += n
        total += n
    for layer in model.layers:  # fp8 experts live outside the module tree
        fp8 = getattr(layer.mlp, "fp8", None)
        if fp8 is not None:
            n = sum(x.numel() * x.element_size() for x in (fp8.w13, fp8.s13, fp8.w2, fp8.s2))
            experts += n
            total += n
    return {"total": total, "experts": experts}


def kv_bytes_per_token(cfg) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2


def run_bench(eng, batch: int, input_len: int, output_len: int, repeats: int) -> dict:
    from thinkgate.bench.engine import bench_engine

    return bench_engine("", [batch], input_len, output_len, repeats=repeats, engine=eng)[0]


def part(fn):
    """Run one part; a failure is recorded and the script goes on to the next."""
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except Exception as e:  # noqa: BLE001 - one part's failure must not cost the lease's other figures
            R.setdefault("errors", {})[fn.__name__] = repr(e)[:800]
            say(f"PART {fn.__name__} FAILED: {e!r}"[:800])
            traceback.print_exc()
            save()
            torch.cuda.empty_cache()
    return wrapper


@part
def long_context():
    """Qwen3-0.6B shape: decode tok/s at batch 1 against context (1K-32K), and batch 32 at 8K each, split-K
    kernel on; batch 1 at 32K again with the split turned off (one program per sequence and KV head)."""
    import thinkgate.layers.triton_attention as ta

    bw = R["env"]["copy_bw_Bps"]
    eng = engine("random:qwen3-0.6b", 32, 33 * 1024, 40)
    wb = weight_bytes(eng.runner.model)["total"]
    per_tok = kv_bytes_per_token(eng.runner.model.cfg)
    rows = []
    for batch, ctx in [(1, 1024), (1, 4096), (1, 16384), (1, 32768), (32, 1024), (32, 8192)]:
        r = run_bench(eng, batch, ctx - 64, 64, 3 if batch == 1 else 2)
        floor_s = (wb + batch * ctx * per_tok) / bw
        row = {"batch": batch, "context": ctx, "decode_tok_s": r["decode_tok_s"], "prefill_tok_s": r["prefill_tok_s"],
               "floor_tok_s": batch / floor_s, "share_of_floor": r["decode_tok_s"] / (batch / floor_s)}
        rows.append(row)
        say(f"  long ctx batch {batch} ctx {ctx}: {row['decode_tok_s']:.0f} tok/s, floor {row['floor_tok_s']:.0f}"
            f" ({100 * row['share_of_floor']:.0f}%)")
        R["long_context"] = {"weight_bytes": wb, "kv_bytes_per_token": per_tok, "rows": rows}
        save()
    del eng
    torch.cuda.empty_cache()
    ta.MAX_SPLITS, keep = 1, ta.MAX_SPLITS
    try:
        eng = engine("random:qwen3-0.6b", 1, 33 * 1024, 6)
        r = run_bench(eng, 1, 32768 - 64, 64, 2)
        R["long_context"]["no_split_b1_32k_tok_s"] = r["decode_tok_s"]
        say(f"  without the split, batch 1 at 32K: {r['decode_tok_s']:.0f} tok/s")
    finally:
        ta.MAX_SPLITS = keep
    del eng
    torch.cuda.empty_cache()
    save()
    plot(rows)


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b1 = [r for r in rows if r["batch"] == 1]
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot([r["context"] for r in b1], [r["decode_tok_s"] for r in b1], "o-", label="thinkgate (split-K kernel)")
    ax.plot([r["context"] for r in b1], [r["floor_tok_s"] for r in b1], "k--", label="floor (weights + KV at copy bw)")
    nosplit = R["long_context"].get("no_split_b1_32k_tok_s")
    if nosplit:
        ax.plot([32768], [nosplit], "rx", label="one program per KV head (no split)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode tok/s, batch 1")
    ax.set_title(f"Qwen3-0.6B shape, bf16, {R['env']['device']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "long_context.png"), dpi=110)


@part
def prefill():
    """Time to first token for 1K / 8K / 32K prompts, against the compute floor."""
    rate = R["env"]["bf16_flops"]
    out = {}
    for spec, kv in [("random:qwen3-0.6b", 6), ("random:qwen3-30b-a3b", 8)]:
        eng = engine(spec, 4, 33 * 1024, kv)
        cfg = eng.runner.model.cfg
        wb = weight_bytes(eng.runner.model)
        active = (wb["total"] - wb["experts"]) / 2
        if wb["experts"]:
            active += wb["experts"] / 2 * cfg.num_experts_per_tok / cfg.num_experts
        rows = []
        for n in (1024, 8192, 32768 - 64):
            r = run_bench(eng, 1, n, 2, 3)
            ttft = n / r["prefill_tok_s"]
            attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * n * n / 2  # causal QK^T and PV
            floor = (2 * active * n + attn) / rate
            rows.append({"prompt": n, "ttft_s": ttft, "floor_s": floor, "share_of_floor": floor / ttft})
            say(f"  prefill {spec} {n}: TTFT {1000 * ttft:.0f} ms, floor {1000 * floor:.0f} ms "
                f"({100 * floor / ttft:.0f}%)")
        out[spec] = {"active_params": active, "rows": rows}
        R["prefill"] = out
        save()
        del eng
        torch.cuda.empty_cache()


def in_situ(eng, batch: int) -> dict:
    """Where a MoE decode step's time goes inside the engine's own loop: the GPU time of each graph run
    (events around it, no sync) and the host's wall time between consecutive runs."""
    graphs = eng.runner.graphs
    evs, walls, host = [], [], []
    orig = graphs.run

    def wrapped(*a):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        walls.append(t)
        s.record()
        out = orig(*a)
        e.record()
        host.append(time.perf_counter() - t)
        evs.append((s, e))
        return out

    graphs.run = wrapped
    try:
        run_bench(eng, batch, 128, 64, 1)
    finally:
        graphs.run = orig
    torch.cuda.synchronize()
    gpu = [s.elapsed_time(e) for s, e in evs[-40:]]
    gaps = [1000 * (b - a) for a, b in zip(walls[-41:], walls[-40:], strict=False)]
    res = {"gpu_ms_per_run": statistics.median(gpu), "wall_ms_between_runs": statistics.median(gaps),
           "host_ms_inside_run": 1000 * statistics.median(host[-40:])}
    say(f"  in situ batch {batch}: graph run on the GPU {res['gpu_ms_per_run']:.2f} ms, runs every "
        f"{res['wall_ms_between_runs']:.2f} ms, host inside run() {res['host_ms_inside_run']:.2f} ms")
    return res


def moe_floor(eng, batch: int) -> float:
    """Seconds to read what a decode step must: the non-expert weights, and at near-uniform routing the
    expected number of distinct experts chosen by `batch` tokens (top-k of E each)."""
    cfg = eng.runner.model.cfg
    wb = weight_bytes(eng.runner.model)
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    distinct = e * (1 - (1 - k / e) ** batch)
    return (wb["total"] - wb["experts"] + wb["experts"] * distinct / e) / R["env"]["copy_bw_Bps"]


def timed_ms(fn, reps: int = 20) -> float:
    """Median GPU time of fn, replayed from a CUDA graph (as the engine runs it: no launch gaps)."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


@part
def moe_layer():
    """One 30B-A3B expert layer (128 experts, top-8, hidden 2048, 768 per expert) at batch 1 and 32: the
    grouped-GEMM path op by op, the fused kernels over a few tile configurations (the best becomes the
    engine's for the runs below), and the layer's floor (distinct experts' bytes at copy bandwidth)."""
    import thinkgate.layers.triton_moe as tm
    from thinkgate.layers.fp8 import quantize_weight

    e, h, i = 128, 2048, 768
    w13 = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16) / h ** 0.5
    w2 = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16) / i ** 0.5
    q13, s13 = quantize_weight(w13)
    q2, s2 = quantize_weight(w2)
    res = {}
    configs = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
               for bn, bk, nw, ns in [(64, 128, 4, 3), (32, 128, 4, 3), (128, 64, 4, 3), (64, 256, 4, 2),
                                      (32, 256, 4, 3), (64, 128, 8, 4), (128, 128, 8, 3), (16, 256, 2, 3)]]
    score = {i: 0.0 for i in range(len(configs))}
    for t in (1, 32):
        row = _layer_row(t, configs, w13, w2, q13, s13, q2, s2)
        res[t] = row
        for ci, ms in enumerate(row["fused_ms_by_config"]):
            score[ci] += ms / row["floor_ms"]
    best = min(score, key=score.get)
    tm.CONFIG = configs[best]
    res["configs"] = configs
    res["chosen"] = configs[best]
    R["moe_layer"] = res
    say(f"  fused MoE config for the engine runs: {configs[best]}")
    save()
    torch.cuda.empty_cache()


def _layer_row(t, configs, w13, w2, q13, s13, q2, s2) -> dict:
    import thinkgate.layers.triton_moe as tm
    from thinkgate.layers.moe import grouped_moe, route

    e, _, h = w13.shape
    k = 8
    per_expert = 3 * w13.shape[1] // 2 * h * 2
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(t, e, device="cuda")
    weights, experts = route(logits, k, True, x.dtype)
    distinct = experts.unique().numel()
    floor_ms = 1000 * distinct * per_expert / R["env"]["copy_bw_Bps"]
    flat = experts.reshape(-1)
    xs = x[torch.argsort(flat) // k]
    offs = torch.cumsum(torch.bincount(flat, minlength=e), 0).to(torch.int32)
    row = {"distinct_experts": distinct, "floor_ms": floor_ms,
           "route_ms": timed_ms(lambda: route(logits, k, True, x.dtype)),
           "grouped_ms": timed_ms(lambda: grouped_moe(x, weights, experts, w13, w2)),
           "grouped_mm_gate_up_ms": timed_ms(lambda: torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs))}
    fused = []
    for cfg in configs:
        tm.CONFIG = cfg
        try:
            fused.append(timed_ms(lambda: tm.fused_moe(x, weights, experts, w13, w2)))
        except Exception as ex:  # noqa: BLE001 - a config the compiler refuses is skipped
            fused.append(float("inf"))
            say(f"  config {cfg} failed: {ex!r}"[:300])
    row["fused_ms_by_config"] = fused
    best = min(range(len(configs)), key=lambda j: fused[j])
    tm.CONFIG = configs[best]
    row["fused_fp8_ms"] = timed_ms(lambda: tm.fused_moe(x, weights, experts, q13, q2, s13, s2))
    row["fp8_floor_ms"] = floor_ms / 2
    say(f"  layer batch {t}: floor {floor_ms:.3f} ms ({distinct} experts), grouped {row['grouped_ms']:.3f} ms "
        f"(gate/up GEMM {row['grouped_mm_gate_up_ms']:.3f}), route {row['route_ms']:.3f}, fused best "
        f"{min(fused):.3f} ms {configs[best]}, fused fp8 {row['fused_fp8_ms']:.3f} ms")
    return row


def moe_runs(tag: str, fused_max: int = 64, **kw):
    import thinkgate.layers.moe as moe_mod

    moe_mod.FUSED_MAX_TOKENS = fused_max
    eng = engine("random:qwen3-30b-a3b", 32, 4096, 8, 2048, **kw)
    rows = []
    for b in (1, 32):
        r = run_bench(eng, b, 128, 128, 2)
        floor = moe_floor(eng, b)
        step = 1000 * b / r["decode_tok_s"]
        row = {"batch": b, "decode_tok_s": r["decode_tok_s"], "step_ms": step, "floor_ms": 1000 * floor,
               "step_over_floor": step / (1000 * floor), "replay_ms": replay_ms(eng, b)}
        rows.append(row)
        say(f"  {tag} batch {b}: {r['decode_tok_s']:.0f} tok/s, step {step:.2f} ms, replay {row['replay_ms']:.2f} ms,"
            f" floor {1000 * floor:.2f} ms -> {row['step_over_floor']:.2f}x")
        R[tag] = {"rows": rows}
        save()
    R[tag]["in_situ_32"] = in_situ(eng, 32)
    save()
    del eng
    torch.cuda.empty_cache()


@part
def moe():
    moe_runs("moe_bf16")  # fused kernels for decode
    moe_runs("moe_bf16_grouped", fused_max=0)  # the first round's path: grouped GEMMs


@part
def fp8():
    moe_runs("moe_fp8", quantization="fp8")  # fused kernels, fp8 weights upcast in registers
    moe_runs("moe_fp8_scaled_grouped", fused_max=0, quantization="fp8")  # fp8 x fp8 scaled grouped GEMMs
    import thinkgate.layers.moe as moe_mod

    moe_mod.FUSED_MAX_TOKENS = 64
    eng = engine("random:qwen3-0.6b", 32, 4096, 4, 2048, quantization="fp8")
    R["small_fp8"] = [run_bench(eng, b, 128, 128, 2) for b in (1, 32)]
    say(f"  0.6B fp8: {[round(r['decode_tok_s']) for r in R['small_fp8']]} tok/s at batch 1, 32")
    save()
    del eng
    torch.cuda.empty_cache()


@part
def hf_moe():
    from gpu import RESULTS, transformers_eager

    transformers_eager("qwen3-30b-a3b", "qwen3_moe", [32], new_tokens=32)
    R["transformers_eager_30b_b32_tok_s"] = RESULTS["transformers-eager qwen3-30b-a3b"][32]
    save()


def main(parts: list[str]):
    ceilings()
    if "moe" in parts or "fp8" in parts:
        moe_layer()
    if "long" in parts:
        long_context()
    if "moe" in parts:
        moe()
    if "fp8" in parts:
        fp8()
    if "prefill" in parts:
        prefill()
    if "hf-moe" in parts:
        hf_moe()
    say("done")
    print(json.dumps(R, indent=1, default=str))


if __name__ == "__main__":
    main(sys.argv[1:] or ["long", "moe", "fp8", "prefill", "hf-moe"])
