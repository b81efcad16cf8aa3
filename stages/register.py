"""Stage ``register``: the trained weights (LoRA or full UNet) as an MLflow pyfunc model version, gated.

Reads params ``model``, ``sampling``, ``register`` and ``train.method`` (the default registered model
name is ``prefdiff-<method>``); reads ``models/trained`` and ``metrics/eval.json``; writes
``registry/decision.json``. Re-running with unchanged inputs registers nothing new.
"""

from __future__ import annotations

import json

from stages._common import load_or_exit, run_stage, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    from prefdiff.data.atomic import atomic_write_json
    from prefdiff.gate import RE_EVALUATE
    from prefdiff.registry import gate_rule, register_model

    rp = params.register
    with tracked("register", params, paths, ("register",)) as log_metrics:
        eval_metrics = json.loads(paths.eval_metrics.read_text())
        model_config = {"base_source": params.model.source, "revision": params.model.revision,
                        "dtype": params.model.dtype, "device": "cpu", **params.sampling.model_dump()}
        done = register_model(root=paths.root, weights_dir=paths.trained, eval_metrics=eval_metrics,
                              model_config=model_config, model_name=rp.registered_name(params.train.method),
                              rule=gate_rule(rp), experiment=rp.experiment)
        paths.decision.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(paths.decision, done.to_dict())
        verb = "kept" if done.reused else "registered"
        say(f"register: {verb} {done.model_name} v{done.version} as {done.alias}: {done.reason}")
        if done.action == RE_EVALUATE:
            say("register: not comparable with the champion; set evaluate.baseline: champion and run the round "
                "again to gate this model against it")
        log_metrics({"register/version": int(done.version), "register/champion": int(done.alias == "champion")})


if __name__ == "__main__":
    run_stage(main)
