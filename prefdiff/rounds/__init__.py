"""Many preference rounds in one run, no process per round (D3PO, Yang et al. 2024, Algorithm 1; Sec. 5.1 and 5.2).

Round r samples prompt groups from round r-1's policy, labels them with an automatic judge (or simulated
annotators), and trains on them; the model, its optimizer, the judge and the base's evaluation samples stay
in memory from round to round, and every round's trajectories, preferences and LoRA are written under
``data/rounds/round-NNN`` (``loop.run_rounds``; the files: ``records``).

Why a layer of its own, between ``prefdiff.tracking`` and ``evaluation`` (pyproject.toml's import-linter
contract): a round needs sampling, labeling, training and evaluation's win-rate and implicit-accuracy
functions, and ``prefdiff.training`` and ``prefdiff.labeling`` are independent siblings that may not import
each other; evaluation could import both, but running rounds is not evaluating. The loop never imports
MLflow: the stage (``stages/rounds.py``) and the flow (``flows/rounds.py``) log each round through
``prefdiff.tracking``, so this layer sits under it.
"""
