"""pytest-kvcache: benchmark KV-cache strategies for LLM inference and gate CI on regressions."""

__version__ = "0.1.0"
