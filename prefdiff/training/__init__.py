"""prefdiff.training."""
