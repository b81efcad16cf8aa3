"""prefdiff.sampling."""
