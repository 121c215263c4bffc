"""thinkgate: a self-hosted OpenAI-compatible API for Qwen3 thinking models."""

__version__ = "0.1.0"
