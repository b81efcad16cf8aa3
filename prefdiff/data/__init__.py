"""Versioned datasets: trajectory and preference stores (safetensors shards / JSONL plus an index)."""


class DatasetError(ValueError):
    """A dataset file is missing, corrupt, truncated or of an unknown schema; the message names the file."""
