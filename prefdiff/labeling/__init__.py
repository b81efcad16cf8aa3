"""prefdiff.labeling."""
