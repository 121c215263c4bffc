"""The GPU benchmark, one prepared script (run by benchmarks/gpu.sh on a lent H100/H200).

Random weights in real shapes built in device memory (no files), bf16, greedy, 128 prompt + 128 output
tokens. For each shape: start-up (load + graph capture), engine decode tok/s per batch size, and where the
step's time goes (graph replay alone vs the whole step). transformers' eager `generate` on the same shapes
runs in the same process as the peer. Results go to $OUT/gpu_results.json as they come.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

OUT = os.environ.get("OUT", ".")
RESULTS: dict = {}
T_START = time.time()


def save():
    with open(os.path.join(OUT, "gpu_results.json"), "w") as f:
        json.dump(RESULTS, f, indent=1)


def replay_ms(eng, bs: int, reps: int = 50) -> float:
    graph, _ = eng.runner.graphs.graphs[bs]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def breakdown(eng, b: int) -> dict:
    """Where a decode step's time goes at batch b: graph run (buffers + replay), sampler, the rest."""
    from thinkgate.bench.engine import bench_engine

    spent = {"graph_run_ms": 0.0, "sampler_ms": 0.0}
    graphs, sampler = eng.runner.graphs, eng.runner.sampler
    orig_run, orig_sample = graphs.run, sampler.__call__

    def timed(key, fn):
        def wrapper(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            spent[key] += 1000 * (time.perf_counter() - t)
            return out
        return wrapper

    graphs.run = timed("graph_run_ms", orig_run)
    eng.runner.sampler = timed("sampler_ms", orig_sample)
    try:
        r = bench_engine("", [b], 128, 128, repeats=1, engine=eng)[0]
    finally:
        graphs.run, eng.runner.sampler = orig_run, sampler
    steps = 128 + 2  # decode steps plus the prefill ones (which the sampler also sees)
    res = {k: v / steps for k, v in spent.items()}
    res["step_ms"] = 1000 * b / r["decode_tok_s"]
    print(f"  breakdown batch {b}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()), flush=True)
    return res


def ours(spec: str, batches: list[int], max_num_seqs: int, kv_gib: int, repeats: int, eager: bool = False,
         fused: bool = True, breakdown_at: tuple[int, ...] = ()):
    from thinkgate.bench.engine import bench_engine
    from thinkgate.config import EngineConfig
    from thinkgate.engine.llm_engine import LLMEngine

    key = spec + (" (eager)" if eager else "") + ("" if fused else " (unfused)")
    t = time.time()
    eng = LLMEngine.from_config(EngineConfig(model=spec, dtype="bfloat16", device="cuda", max_num_seqs=max_num_seqs,
                                             enable_prefix_caching=False, max_model_len=4096,
                                             kv_cache_memory=kv_gib * 2**30, enforce_eager=eager or not fused))
    if not fused and not eager:
        eng.runner.enable_paged_decode(max_num_seqs, eng.max_model_len, "capture", fused=False)
    torch.cuda.synchronize()
    startup = time.time() - t
    print(f"{key}: start-up {startup:.1f} s", flush=True)
    res = bench_engine(spec, batches, 128, 128, repeats=repeats, engine=eng)
    entry = {"startup_s": startup, "runs": res}
    if breakdown_at:
        entry["breakdown"] = {b: breakdown(eng, b) for b in breakdown_at}
    if eng.runner.graphs is not None:
        entry["replay_ms"] = {b: replay_ms(eng, b) for b in batches if b in eng.runner.graphs.graphs}
        for r in res:
            b = r["num_seqs"]
            if b in entry["replay_ms"]:
                step = 1000 * b / r["decode_tok_s"]
                r["step_ms"], r["replay_ms"] = step, entry["replay_ms"][b]
                print(f"  batch {b}: step {step:.2f} ms, graph replay {entry['replay_ms'][b]:.2f} ms "
                      f"-> host side {step - entry['replay_ms'][b]:.2f} ms", flush=True)
    entry["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    RESULTS[key] = entry
    save()
    del eng
    torch.cuda.empty_cache()


def hf_random_model(preset: str, arch: str):
    """transformers' model class for a preset, random weights built on the GPU in bf16."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from thinkgate.devtools.presets import hf_config

    cfg = hf_config(arch, preset, 151936, "bfloat16")
    conf = AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if k != "architectures"})
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(conf, dtype=torch.bfloat16).eval()


def transformers_eager(preset: str, arch: str, batches: list[int], new_tokens: int = 64):
    model = hf_random_model(preset, arch)
    entry = {}
    g = torch.Generator().manual_seed(0)
    for b in batches:
        ids = torch.randint(0, 151000, (b, 128), generator=g).cuda()
        rates = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)
            torch.cuda.synchronize()
            rates.append(b * new_tokens / (time.perf_counter() - t))
        entry[b] = statistics.median(rates)
        print(f"transformers eager {preset} batch {b}: {entry[b]:.1f} tok/s", flush=True)
    RESULTS[f"transformers-eager {preset}"] = entry
    save()
    del model
    torch.cuda.empty_cache()


def transformers_compiled(preset: str, arch: str, batches: list[int], new_tokens: int = 128):
    """transformers' fastest path: static KV cache, generate() compiles the forward (reduce-overhead)."""
    model = hf_random_model(preset, arch)
    entry = {}
    g = torch.Generator().manual_seed(0)
    for b in batches:
        ids = torch.randint(0, 151000, (b, 128), generator=g).cuda()
        rates, first = [], None
        for i in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                with torch.no_grad():
                    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, cache_implementation="static")
            except Exception as e:  # noqa: BLE001 - record why the peer could not run
                entry[f"error_{b}"] = repr(e)[:500]
                print("transformers compiled failed:", repr(e)[:500], flush=True)
                break
            torch.cuda.synchronize()
            took = time.perf_counter() - t
            if i == 0:
                first = took
            else:
                rates.append(b * new_tokens / took)
        if rates:
            entry[b] = {"tok_s": statistics.median(rates), "first_call_s": first}
            print(f"transformers compiled {preset} batch {b}: {entry[b]['tok_s']:.1f} tok/s "
                  f"(first call, with compilation: {first:.1f} s)", flush=True)
    RESULTS[f"transformers-compiled {preset}"] = entry
    save()
    del model
    torch.cuda.empty_cache()


def moe_profile(batch: int = 32):
    """Which kernels a 30B-A3B decode step at `batch` spends its time in (torch profiler, CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    from thinkgate.config import EngineConfig
    from thinkgate.engine.llm_engine import LLMEngine
    from thinkgate.sampling.params import SamplingParams

    eng = LLMEngine.from_config(EngineConfig(model="random:qwen3-30b-a3b", dtype="bfloat16", device="cuda",
                                             max_num_seqs=batch, enable_prefix_caching=False, max_model_len=4096,
                                             kv_cache_memory=8 * 2**30))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"p{i}", list(range(100 + i, 228 + i)), params)
    for _ in range(8):
        eng.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            eng.step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    print(table, flush=True)
    with open(os.path.join(OUT, "moe_profile.txt"), "w") as f:
        f.write(table)
    del eng
    torch.cuda.empty_cache()


def main(parts: list[str]):
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["torch"] = torch.__version__
    import triton

    RESULTS["triton"] = triton.__version__
    print(RESULTS, flush=True)
    if "small" in parts:
        ours("random:qwen3-0.6b", [1, 32, 64, 128], 128, 8, 3, breakdown_at=(1, 32))
        ours("random:qwen3-0.6b", [1, 32], 32, 4, 1, fused=False)
        ours("random:qwen3-0.6b", [1], 1, 4, 1, eager=True)
    if "small-only" in parts:
        ours("random:qwen3-0.6b", [1, 32], 32, 8, 3)
    if "small-wide" in parts:
        ours("random:qwen3-0.6b", [1, 32, 64, 128], 128, 8, 3)
    if "hf-compiled" in parts:
        transformers_compiled("qwen3-0.6b", "qwen3", [1, 32])
    if "hf-small" in parts:
        transformers_eager("qwen3-0.6b", "qwen3", [1, 32])
    if "moe" in parts:
        ours("random:qwen3-30b-a3b", [1, 32, 64], 64, 8, 2, breakdown_at=(32,))
    if "moe-quick" in parts:
        ours("random:qwen3-30b-a3b", [1, 32], 32, 8, 2)
    if "moe-profile" in parts:
        try:
            moe_profile()
        except Exception as e:  # noqa: BLE001 - the profile is a diagnostic; the figures above stand
            print("profile failed:", repr(e)[:300], flush=True)
    if "hf-moe" in parts and time.time() - T_START < 300:
        transformers_eager("qwen3-30b-a3b", "qwen3_moe", [32], new_tokens=32)
    print(json.dumps(RESULTS, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:] or ["small", "hf-small", "moe", "hf-moe"])
