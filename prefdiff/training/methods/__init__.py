"""One module per training method, each a ``prefdiff.training.fit.Method`` registered in ``prefdiff.catalog``."""
