"""MLflow "models from code" file: a base diffusion pipeline plus the registered weights, served as pyfunc.

``prefdiff.registry.register_model`` logs this *file* (not a pickled object) with
``artifacts={"weights": <a LoRA dir, or a full UNet under unet/>}``,
``model_config={"base_source": ..., "dtype": ..., "device": ...}``
and the ``prefdiff`` package as ``code_paths``; MLflow executes it at load time and serves the object
passed to ``set_model``. The base weights are not logged: ``base_source`` names them (built-in tiny
model, a hub id in the local cache, or a local directory).

Input: DataFrame with a string column ``prompt``. Params (signature defaults): ``seed`` (row i gets
seed + i), ``num_inference_steps``, ``guidance_scale``, ``eta``. Output: DataFrame with ``prompt``
(str), ``seed`` (int), ``png`` (bytes, PNG-encoded image). Same prompt + seed -> identical bytes.

``predict`` is deliberately untyped: with type hints MLflow would infer a signature from them,
override the logged one and drop the params.
"""

from __future__ import annotations

import mlflow


class TrainedDiffusionModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from pathlib import Path

        from prefdiff.models.loading import load_pipeline
        from prefdiff.models.finetuned import apply_trained

        config = context.model_config or {}
        if "base_source" not in config:
            raise ValueError(f"model_config has no 'base_source'; got keys {sorted(config)}")
        self.pipe = load_pipeline(
            config["base_source"],
            dtype=config.get("dtype", "float32"),
            device=config.get("device", "cpu"),
        )
        apply_trained(self.pipe, Path(context.artifacts["weights"]))  # a LoRA, or a full UNet under unet/

    def predict(self, context, model_input, params=None):
        import io

        import pandas as pd

        from prefdiff.sampling.sampler import SamplingConfig, generate

        if isinstance(model_input, pd.DataFrame):
            if "prompt" not in model_input.columns:
                raise ValueError(f"input needs a 'prompt' column; got columns {list(model_input.columns)}")
            prompts = [str(p) for p in model_input["prompt"].tolist()]
        elif isinstance(model_input, dict) and "prompt" in model_input:
            raw = model_input["prompt"]
            prompts = [str(raw)] if isinstance(raw, str) else [str(p) for p in raw]
        elif isinstance(model_input, (list, tuple)):
            prompts = [str(p) for p in model_input]
        else:
            raise ValueError(f"input must be a DataFrame with a 'prompt' column; got {type(model_input).__name__}")

        params = params or {}
        defaults = SamplingConfig()
        base_seed = int(params.get("seed", 0))
        seeds = [base_seed + i for i in range(len(prompts))]  # positional row index, not the DataFrame index
        cfg = SamplingConfig(
            num_steps=int(params.get("num_inference_steps", defaults.num_steps)),
            eta=float(params.get("eta", defaults.eta)),
            guidance_scale=float(params.get("guidance_scale", defaults.guidance_scale)),
        )
        images = generate(self.pipe, prompts, seeds, cfg) if prompts else []

        pngs = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        return pd.DataFrame(
            {
                "prompt": pd.Series(prompts, dtype=object),
                "seed": pd.Series(seeds, dtype="int64"),
                "png": pd.Series(pngs, dtype=object),
            }
        )


mlflow.models.set_model(TrainedDiffusionModel())
