#!/usr/bin/env bash
# Serve Qwen3-235B-A22B-Thinking-2507 on SGLang, as a second upstream of thinkgate's catalog entry
# "qwen/qwen3-235b-a22b-thinking-2507" (examples/gateway-catalog.toml: base_url http://sglang.internal:30000/v1,
# api_key_env SGLANG_API_KEY, remote_model = the --served-model-name below).
#
# Where the flags come from:
# - The model card (read from the copy of the -FP8 card in akash-network/awesome-akash): "python -m
#   sglang.launch_server --model-path Qwen/Qwen3-235B-A22B-Thinking-2507-FP8 --tp 4 --context-length 262144
#   --reasoning-parser deepseek-r1" (TP=8 for the BF16 weights).
# - SGLang, "Reasoning Parser" (docs.sglang.io/advanced_features/separate_reasoning.html): for
#   Qwen3-235B-A22B-Thinking-2507 use qwen3 or qwen3-thinking; qwen3-thinking always reads the output as
#   reasoning until </think> (it was added for this model, SGLang PR #8363), as the card's deepseek-r1 does.
# - SGLang, "Tool Parser" (docs.sglang.io/docs/advanced_features/tool_parser.md): qwen25 parses Qwen's
#   <tool_call>{json}</tool_call> blocks (Qwen 2.5, QwQ and Qwen3).
# - SGLang, "Server Arguments" (docs.sglang.io/cookbook/base/reference/server_arguments): --tp-size and
#   --ep-size (alias --ep); "Expert Parallelism" (docs.sglang.io/advanced_features/expert_parallelism.html):
#   experts distributed over the GPUs of the tensor-parallel group.
# SGLang sends the reasoning as `reasoning_content`, which thinkgate reads as it reads vLLM's `reasoning`.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen3-235B-A22B-Thinking-2507}  # or Qwen/Qwen3-235B-A22B-Thinking-2507-FP8 with TP=4
TP=${TP:-8}

exec python -m sglang.launch_server \
  --model-path "$MODEL" \
  --served-model-name Qwen/Qwen3-235B-A22B-Thinking-2507 \
  --tp-size "$TP" \
  --ep-size "$TP" \
  --context-length 262144 \
  --reasoning-parser qwen3-thinking \
  --tool-call-parser qwen25 \
  --api-key "${SGLANG_API_KEY:?set SGLANG_API_KEY: the gateway sends it (api_key_env in the catalog)}" \
  --host 0.0.0.0 --port 30000
