"""Stage ``register``: the trained weights (LoRA or full UNet) as an MLflow pyfunc model version, gated.

Reads params ``model``, ``sampling``, ``register`` and ``train.method`` (the default registered model
name is ``prefdiff-<method>``); reads ``models/trained`` and ``metrics/eval.json``; writes
``registry/decision.json``. Re-running with unchanged inputs registers nothing new, and finishes a
registration a crash interrupted (``prefdiff.registry.register_model``).

Metrics the gate cannot judge (missing, non-numeric, non-finite) are refused with one ``error:`` line
(exit 2) before the registry is touched; an unreachable tracking server is retried, then named in one
``error:`` line (exit 1): the trained weights stay where they are.
"""

from __future__ import annotations

import json
import sys

from stages._common import load_or_exit, refuse, run_stage, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    from prefdiff.data.atomic import atomic_write_json
    from prefdiff.gate import RE_EVALUATE, check_finite
    from prefdiff.registry import candidate_from_metrics, gate_rule, register_model
    from prefdiff.tracking import TrackingUnavailable, require_server

    rp = params.register
    rule = gate_rule(rp)
    try:
        eval_metrics = json.loads(paths.eval_metrics.read_text())
    except (OSError, json.JSONDecodeError) as err:
        refuse(f"{paths.eval_metrics}: cannot read the evaluation's metrics ({err}); run the evaluate stage first")
    try:
        check_finite(candidate_from_metrics(eval_metrics, rule), rule)
    except ValueError as err:
        refuse(f"{paths.eval_metrics}: {err}")
    try:
        require_server(paths.root)
        with tracked("register", params, paths, ("register",)) as log_metrics:
            model_config = {"base_source": params.model.source, "revision": params.model.revision,
                            "dtype": params.model.dtype, "device": "cpu", **params.sampling.model_dump()}
            done = register_model(root=paths.root, weights_dir=paths.trained, eval_metrics=eval_metrics,
                                  model_config=model_config, model_name=rp.registered_name(params.train.method),
                                  rule=rule, experiment=rp.experiment)
            paths.decision.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(paths.decision, done.to_dict())
            verb = "kept" if done.reused else "registered"
            say(f"register: {verb} {done.model_name} v{done.version} as {done.alias}: {done.reason}")
            if done.action == RE_EVALUATE:
                say("register: not comparable with the champion; set evaluate.baseline: champion and run the "
                    "round again to gate this model against it")
            log_metrics({"register/version": int(done.version), "register/champion": int(done.alias == "champion")})
    except TrackingUnavailable as err:
        print(f"error: {err}; nothing was lost: the trained weights stay in {paths.trained}; run "
              "`dvc repro -s register` (or the round) again when the server is back", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run_stage(main)
