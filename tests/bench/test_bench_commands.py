"""`thinkgate bench serve` against a real server and `thinkgate bench engine` on a tiny checkpoint, run
through the CLI as a user runs them."""

import json

from thinkgate.bench.prompts import synthetic_prompts
from thinkgate.cli import main


def test_bench_serve_reports_every_metric_per_level(server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--url", server.base, "--model", server.model_id, "--concurrency", "1,3",
               "--num-requests", "4", "--input-len", "24", "--output-len", "6", "--ignore-eos", "--out", str(out)])
    assert rc == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("conc  reqs  ok  req/s  out tok/s") and len(table) == 3
    assert [line.split()[:3] for line in table[1:]] == [["1", "4", "4"], ["3", "4", "4"]]
    report = json.loads(out.read_text())
    assert report["model"] == server.model_id and [lv["concurrency"] for lv in report["levels"]] == [1, 3]
    for lv in report["levels"]:
        assert lv["completed"] == 4 and lv["errors"] == []
        assert lv["mean_output_tokens"] == 6  # ignore_eos: every request runs to its budget
        assert lv["mean_prompt_tokens"] > 20  # ~24 words of chat prompt, counted by the server's usage
        assert lv["output_throughput"] > 0 and lv["total_token_throughput"] > lv["output_throughput"]
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            s = lv[key]
            assert 0 < s["median"] <= s["p99"] and s["mean"] > 0, key
        assert lv["ttft_s"]["median"] <= lv["e2e_s"]["median"]
        # The tiny model's template opens a thinking block: its tokens stream as reasoning, reported apart
        # from content (random weights seldom close the block, so content may never come).
        assert lv["first_reasoning_s"]["median"] is not None
        assert lv["first_reasoning_s"]["median"] >= lv["ttft_s"]["median"] - 1e-9


def test_bench_serve_is_bounded_and_reports_errors(server, capsys):
    from thinkgate.bench.serve import bench_serve

    # a wall-time bound of zero: nothing is sent after the deadline
    levels = bench_serve(server.base + "/v1", server.model_id, [2], 6, 8, 4, True, None, max_seconds=0)
    assert levels[0]["requests"] == 0 and levels[0]["completed"] == 0
    # an unknown model: every request fails with the server's 404, reported, not raised
    levels = bench_serve(server.base, "no-such-model", [2], 3, 8, 4, True, None)
    assert levels[0]["completed"] == 0 and levels[0]["requests"] == 3
    assert all(e.startswith("HTTP 404") for e in levels[0]["errors"])
    capsys.readouterr()


def test_synthetic_prompts_are_seeded_and_share_a_prefix():
    a = synthetic_prompts(5, 100, seed=1, shared_prefix_len=60, jitter=0.2)
    assert a == synthetic_prompts(5, 100, seed=1, shared_prefix_len=60, jitter=0.2)
    assert a != synthetic_prompts(5, 100, seed=2, shared_prefix_len=60, jitter=0.2)
    prefix = a[0].split()[:60]
    assert all(p.split()[:60] == prefix for p in a)
    assert len({p for p in a}) == 5 and all(75 <= len(p.split()) <= 125 for p in a)


def test_bench_engine_measures_and_profiles(checkpoints, capsys):
    rc = main(["bench", "engine", "--model", str(checkpoints["qwen3"]), "--num-seqs", "1,2", "--input-len", "8",
               "--output-len", "6", "--repeats", "2", "--profile"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("seqs=  1 input=8 output=6  decode") and "(median of 2)" in lines[0]
    assert lines[1].startswith("seqs=  2 input=8 output=6  decode")
    assert lines[2].startswith("batch-1 decode step") and "engine overhead" in lines[2]


def test_bench_engine_profile_splits_the_step(engine_factory):
    from thinkgate.bench.engine import bench_engine

    eng = engine_factory("qwen3", enable_prefix_caching=False)
    res = bench_engine("unused", [1], 8, 6, repeats=1, engine=eng)
    assert res[0]["num_seqs"] == 1 and res[0]["decode_tok_s"] > 0 and res[0]["prefill_tok_s"] > 0
    from thinkgate.bench.engine import profile_step

    prof = profile_step(eng, steps=8)
    assert prof["steps"] >= 8 and prof["model_ms"] > 0 and prof["overhead_ms"] >= 0
    assert abs(prof["model_ms"] + prof["overhead_ms"] - prof["step_ms"]) < 1e-6
