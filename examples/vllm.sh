#!/usr/bin/env bash
# Serve Qwen3-235B-A22B-Thinking-2507 on vLLM, as the upstream of thinkgate's catalog entry
# "qwen/qwen3-235b-a22b-thinking-2507" (examples/catalog.toml, examples/gateway-catalog.toml: base_url
# http://vllm.internal:8000/v1, api_key_env VLLM_API_KEY, remote_model = the --served-model-name below).
#
# Where the flags come from:
# - The model card (Qwen/Qwen3-235B-A22B-Thinking-2507 and its -FP8 sibling; read from the copy of the FP8 card in
#   akash-network/awesome-akash): "vllm serve Qwen/Qwen3-235B-A22B-Thinking-2507-FP8 --tensor-parallel-size 4
#   --max-model-len 262144 --enable-reasoning --reasoning-parser deepseek_r1"; a context above 131072 is strongly
#   recommended (thinking traces are long). The BF16 weights (~470 GB) need 8 GPUs of 80 GB: TP=8.
# - vLLM, "Reasoning Outputs" (docs.vllm.ai/en/v0.10.0/features/reasoning_outputs.html, and stable): since v0.10
#   --reasoning-parser alone turns reasoning on (--enable-reasoning is gone). The card's deepseek_r1 reads
#   everything before </think> as reasoning, which is what the 2507 template needs (it opens <think> in the
#   prompt). vLLM's qwen3 parser does the same only in recent releases (older ones left the whole output in
#   content, vllm#22507), so deepseek_r1 is the choice that works on every version.
# - vLLM, "Tool Calling" (docs.vllm.ai/en/latest/features/tool_calling/) and the Qwen docs: Qwen's
#   <tool_call>{json}</tool_call> format is the hermes parser; tool_choice "auto" needs --enable-auto-tool-choice.
# - vLLM, "Expert Parallel Deployment" / "Data Parallel Deployment" (docs.vllm.ai/en/latest/serving/...):
#   --enable-expert-parallel places whole experts on GPUs (EP size = TP x DP) instead of slicing every expert;
#   attention stays tensor-parallel. Add --data-parallel-size N for more replicas of attention.
# thinkgate reads the answer's `reasoning` or `reasoning_content` (whichever this vLLM sends), asks for usage in
# the stream, and forwards top_k, min_p, repetition_penalty, chat_template_kwargs and the rest (see
# VLLM_PARAMETERS in src/thinkgate/gateway/providers/upstream.py).
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen3-235B-A22B-Thinking-2507}  # or Qwen/Qwen3-235B-A22B-Thinking-2507-FP8 with TP=4
TP=${TP:-8}

exec vllm serve "$MODEL" \
  --served-model-name Qwen/Qwen3-235B-A22B-Thinking-2507 \
  --tensor-parallel-size "$TP" \
  --enable-expert-parallel \
  --max-model-len 262144 \
  --reasoning-parser deepseek_r1 \
  --enable-auto-tool-choice --tool-call-parser hermes \
  --api-key "${VLLM_API_KEY:?set VLLM_API_KEY: the gateway sends it (api_key_env in the catalog)}" \
  --host 0.0.0.0 --port 8000
