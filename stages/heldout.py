"""Stage ``heldout``: held-out preference pairs for the evaluation's implicit reward accuracy.

Reads params ``model``, ``sampling``, the judge keys of ``label`` and the held-out keys of ``evaluate``;
writes ``data/heldout`` (``trajectories/`` and ``preferences/``, or only ``not_sampled.json`` when the
evaluation reads no sampled pairs).
"""

from __future__ import annotations

from stages._common import load_or_exit, run_stage, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    from evaluation.heldout import sample_heldout_pairs
    from prefdiff.data.preferences import PreferenceStore

    with tracked("heldout", params, paths, ()) as log_metrics:
        skipped = sample_heldout_pairs(params, paths.heldout, paths.root, progress=say)
        if skipped is not None:
            say(f"heldout: no pairs sampled ({skipped})")
            return
        summary = PreferenceStore.open(paths.heldout / "preferences").summary()
        say(f"heldout: {summary.num_pairs} pairs, {summary.num_ties} ties")
        log_metrics({"heldout/pairs": summary.num_pairs, "heldout/ties": summary.num_ties})


if __name__ == "__main__":
    run_stage(main)
