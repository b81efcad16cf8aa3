"""Stage ``register``: the trained LoRA as an MLflow pyfunc model version, gated to ``champion``.

Reads params ``model``, ``sampling``, ``register``; reads ``models/trained`` and ``metrics/eval.json``;
writes ``registry/decision.json``. Re-running with unchanged inputs registers nothing new.
"""

from __future__ import annotations

import json

from stages._common import load_or_exit, say, tracked, workspace


def main() -> None:
    paths = workspace()
    params = load_or_exit(paths)
    from prefdiff.data.atomic import atomic_write_json
    from prefdiff.registry import register_lora

    rp = params.register
    with tracked("register", params, paths, ("register",)) as log_metrics:
        eval_metrics = json.loads(paths.eval_metrics.read_text())
        model_config = {"base_source": params.model.source, "revision": params.model.revision,
                        "dtype": params.model.dtype, "device": "cpu", **params.sampling.model_dump()}
        decision = register_lora(root=paths.root, lora_dir=paths.trained, eval_metrics=eval_metrics,
                                 model_config=model_config, model_name=rp.model_name, gate_metric=rp.gate_metric,
                                 base_metric=rp.base_metric, min_improvement=rp.min_improvement,
                                 experiment=rp.experiment)
        paths.decision.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(paths.decision, decision.to_dict())
        verb = "kept" if decision.reused else "registered"
        say(f"register: {verb} {decision.model_name} v{decision.version} as {decision.alias} "
            f"({decision.gate_metric} {decision.value:.4f} vs {decision.compared_with} {decision.compared_to})")
        log_metrics({"register/version": int(decision.version), "register/champion": int(decision.alias == "champion")})


if __name__ == "__main__":
    main()
