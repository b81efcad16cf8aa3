"""prefdiff.serving."""
