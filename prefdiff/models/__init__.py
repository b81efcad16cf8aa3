"""prefdiff.models."""
