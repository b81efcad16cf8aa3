"""Experiments that use the library but are not part of it (known-answer studies, sweeps)."""
