"""Test and development tooling, not serving code: random-weight Hugging Face checkpoints in the shapes
of real Qwen models (random_checkpoint, presets), the small offline-trained Qwen-style tokenizer they carry
(tokenizer_builder), and GGUF -> Hugging Face export for reference runs in transformers (gguf_export).

Tests, benchmarks and fixtures use it. Serving code never imports it, with two exceptions, both lazy (at
the call): the loader's `random:PRESET[:ARCH]` model specs (models/loader.py) and the
`thinkgate model random` command (cli.py).
"""
