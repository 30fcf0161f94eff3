"""gptrain: pre-train GPT-style language models from raw text."""

__version__ = "0.1.0"
