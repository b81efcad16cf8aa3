"""``run_rounds``: D3PO's Algorithm 1 with an automatic judge, every round in one run (no process per round).

Per round r (1..``rounds.count``):

1. sample ``rounds.groups_per_round`` prompt groups from the policy as round r-1 left it (round 1: the base,
   or ``train.init_lora``): the trainable adapter itself samples, nothing is saved and reloaded in between;
2. label them with ``label.judge`` (or simulated annotators, ``label.source: simulated``);
3. on evaluation rounds (every ``rounds.eval_every`` and the last), before the update: the base's log-probs
   of the round's chains give the sampling policy's KL proxy and its implicit accuracy on these fresh pairs
   (no policy pass: the chains' sampling-time log-probs are the policy's);
4. train ``train.method`` on the round's data through ``fit`` with the same model and optimizer (Adam's
   moments carry over, as one optimizer runs through every epoch of the official loop); the reference is the
   base (adapters disabled) or, with ``train.reference: previous_round``, the policy the round started from
   (D3PO Sec. 5.2: "the model fine-tuned after each epoch serves as the reference model for the subsequent
   epoch");
5. on evaluation rounds, after the update: the policy's judge reward and win-rate against the base on the
   evaluation prompts (``evaluate``: the same prompts, seeds and judge as the evaluate stage, the base's
   samples drawn and scored once);
6. write the round (``records``), its curves, and hand its metrics to ``on_round``.

Under ``accelerate launch`` (``rounds.num_processes``) every process runs the loop: they share each round's
sampling (as the sample stage does: the dataset is the one process's), the base's log-prob pass of step 3, the
training (``fit``: every micro-batch shared, DDP) and the evaluation's image generation (as the evaluate stage
does); the main process alone labels, scores, prints and writes, and the others read what it wrote after a
barrier. Every process makes the same collective calls in the same order, whatever a round holds (all ties too).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prefdiff.config import Params
from prefdiff.models.processes import gather_to_all, process_device, process_state, wait_for_everyone
from prefdiff.paths import Paths
from prefdiff.rounds.records import (
    code_sha256,
    completed_rounds,
    derived_seed,
    draw_curves,
    round_dir,
    round_prompts,
    rounds_fingerprint,
    write_curves,
    write_record,
)

NO_UPDATE = "no update"  # a round's state fingerprint when it had no decided pair to train on


def rounds_refusal(params: Params) -> str | None:
    """Why the rounds loop cannot run ``params`` (None: it can), in one line naming the key and what is allowed."""
    if params.label.source not in ("judge", "simulated"):
        return (f"label.source = {params.label.source!r}: the rounds stage labels every round automatically; allowed: "
                "judge, simulated (human-labeled rounds run one flow run per round, sampling with sample.lora)")
    if params.train.finetune != "lora":
        return (f"train.finetune = {params.train.finetune!r}: the rounds stage trains a LoRA (one per round is kept); "
                "allowed: lora")
    if params.rounds.num_processes > params.train.batch_size:  # fit's own refusal, before anything loads
        return (f"rounds.num_processes = {params.rounds.num_processes} > train.batch_size = {params.train.batch_size}: "
                "the processes share every micro-batch, so some would idle; allowed: train.batch_size >= "
                "rounds.num_processes (a multiple of it balances the work)")
    return None


@dataclass
class RoundsResult:  # the main process's (the others' run_rounds returns None)
    rows: list[dict[str, Any]]  # round 0 (the base's evaluation) then one per round
    summary: dict[str, Any]
    resumed: int  # rounds found complete on disk and not recomputed
    computed: list[int] = field(default_factory=list)  # the rounds this call ran


class PolicyEvaluation:
    """The evaluation prompts and seeds (``evaluate``), the primary judge, and the base's scores on them.

    Built on the base pipeline before any adapter exists; ``of(pipe)`` scores what ``pipe`` draws now against
    the base's samples of the same (prompt, seed): the same noise, so the comparison is paired. Under several
    processes (``state``) they share the generation (``generate_shared``, as the evaluate stage); the main process
    alone holds the judge and the scores, and the others' rows are empty."""

    def __init__(self, params: Params, pipe, root: Path, progress: Callable[[str], None], state) -> None:
        from evaluation.evaluate import build_scorers, eval_prompts_and_seeds
        from prefdiff.sampling.sampler import SamplingConfig

        self.params, self.state = params, state
        self.prompts, self.seeds = eval_prompts_and_seeds(params, root)
        self.judge = None
        if state.is_main_process:
            only_primary = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"scorers": []})})
            scorers, _ = build_scorers(only_primary, progress)
            self.judge = scorers[params.eval_judge]
        self.cfg = SamplingConfig(**params.sampling.model_dump())
        self.base = self._scores(pipe)

    def _scores(self, pipe) -> np.ndarray | None:
        """The judge's scores of what ``pipe`` draws, on the main process; None on the others (their share of
        the generation is with the main process)."""
        from evaluation.evaluate import generate_shared
        from prefdiff.scorers import scores_as_decimals

        images = generate_shared(pipe, self.prompts, self.seeds, self.cfg, self.params.evaluate.batch_size, self.state)
        if images is None:
            return None
        return np.asarray(scores_as_decimals(self.judge.score(images, self.prompts)))

    def base_row(self) -> dict[str, float]:
        from evaluation.stats import mean_ci

        if self.base is None:
            return {}
        mean = mean_ci(self.base)
        return {"eval_reward": mean.mean, "eval_reward_low": mean.low, "eval_reward_high": mean.high}

    def of(self, pipe) -> dict[str, float]:
        """The policy's mean reward (95% t-interval) and its win-rate over the base (prompt-clustered bootstrap
        interval, Wilson beside it; ties within ``evaluate.tie_margin`` count half)."""
        from evaluation.stats import mean_ci, win_rate_summary

        ep = self.params.evaluate
        scores = self._scores(pipe)
        if scores is None:
            return {}
        mean = mean_ci(scores)
        wr = win_rate_summary(scores, self.base, self.prompts, tie_margin=ep.tie_margin,
                              higher_is_better=bool(self.judge.higher_is_better), n_boot=ep.bootstrap_samples,
                              seed=ep.seed)
        return {"eval_reward": mean.mean, "eval_reward_low": mean.low, "eval_reward_high": mean.high,
                "win_rate": wr.win_rate, "win_rate_low": wr.win_rate_ci_bootstrap[0],
                "win_rate_high": wr.win_rate_ci_bootstrap[1], "win_rate_wilson_low": wr.win_rate_ci_wilson[0],
                "win_rate_wilson_high": wr.win_rate_ci_wilson[1]}


def sampler_against_base(model, store, preferences, params: Params, state) -> dict[str, float]:
    """KL proxy and implicit accuracy of the policy that sampled ``store``, against the base, on its chains.

    ratio_i = sum_t [log pi(x_{t-1}|x_t) - log pi_base(x_{t-1}|x_t)] of image i's stored chain (per-step
    log-probs are means over C,H,W): pi's are the sampling-time log-probs, the base's are recomputed with the
    adapters disabled. kl_proxy = mean_i ratio_i, a Monte Carlo estimate of KL(pi || pi_base) over the chain
    (per latent dimension), since the chains are pi's own samples; implicit_acc = the share of the round's
    decided pairs whose winner has the larger ratio (ties half; ``evaluation.implicit``), measured on pairs
    the policy was never trained on. ``state``: the accelerate state of the processes that share the base's
    pass (``reference_log_probs``; every process gets the whole table, the one process's bit for bit)."""
    from evaluation.implicit import accuracy_of_log_ratios
    from prefdiff.models.lora import adapters_disabled
    from prefdiff.training.trajectory import TrajectoryImages, reference_log_probs

    ids = list(range(store.num_images))
    images = TrajectoryImages.load(model.pipe, store, ids, model.device)
    sampling = params.sampling
    with adapters_disabled(model.raw_unet):
        base = reference_log_probs(model.pipe, images.chain, images.timesteps, images.embeds, images.uncond, sampling,
                                   eta=sampling.eta, batch_size=64, processes=state)
    ratio = (images.sampled_logp.double() - base.double()).sum(1)  # [N]
    out: dict[str, float] = {"kl_proxy": float(ratio.mean())}
    decided = preferences.training_pairs()
    if decided:
        acc = accuracy_of_log_ratios(ratio, {i: i for i in ids}, decided)
        out |= {"implicit_acc": acc.accuracy, "implicit_acc_low": acc.low, "implicit_acc_high": acc.high}
    return out


def _label(store, judge, params: Params, out_dir: Path, seed: int) -> None:
    """The round's preference dataset: the judge's ranking, or simulated annotators choosing by it."""
    from prefdiff.labeling.pairs import label_trajectories

    lp = params.label
    if lp.source == "simulated":
        from prefdiff.labeling.annotators import Annotator, label_with_annotators

        annotators = [Annotator(accuracy=a.accuracy, bias=a.bias) for a in lp.simulated.annotators]
        label_with_annotators(store, judge, annotators, out_dir, seed=seed, progress=lambda _: None)
    else:
        label_trajectories(store, judge, out_dir, tie_margin=lp.tie_margin, progress=lambda _: None)


def _image_scores(preferences) -> np.ndarray:
    """Each sampled image's judge score, once (an image of a group of G is in G-1 pairs)."""
    scores: dict[int, float] = {}
    for p in preferences.pairs:
        scores[p.winner], scores[p.loser] = p.winner_score, p.loser_score
    return np.asarray([scores[i] for i in sorted(scores)])


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def run_rounds(params: Params, root: Path, *, on_round: Callable[[dict[str, Any]], None] | None = None,
               progress: Callable[[str], None] | None = None) -> RoundsResult | None:
    """Run rounds 1..``rounds.count`` in ``root`` (the workspace), resuming after the complete rounds already
    in ``data/rounds`` (``records``); writes ``data/rounds``, ``metrics/rounds.json``, ``plots/rounds.csv``,
    ``plots/rounds_eval.csv`` and ``plots/rounds.png``. ``on_round`` gets each computed round's metrics row;
    ``progress`` one line per round (default: written above the progress bar).

    Under ``accelerate launch`` every process calls this (the module docstring says what they share); the main
    process alone writes, reports and returns the result, the others return None once the last round is written."""
    from tqdm import tqdm

    from evaluation.stats import mean_ci
    from prefdiff.catalog import TRAIN_METHODS, resolve
    from prefdiff.data.baseline import tree_sha256
    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.data.trajectories import TrajectoryStore
    from prefdiff.labeling.pairs import judge_scorer
    from prefdiff.models.loading import load_pipeline, model_fingerprint
    from prefdiff.prompts import get_prompt_set
    from prefdiff.sampling.dataset import write_trajectories
    from prefdiff.training.checkpoint import load_checkpoint, save_checkpoint
    from prefdiff.training.fit import fit
    from prefdiff.training.trainable import TrainableUNet

    why = rounds_refusal(params)
    if why is not None:
        raise ValueError(why)
    state = process_state(params)
    main = state.is_main_process
    say = (progress or tqdm.write) if main else (lambda _: None)  # one process speaks
    root = Path(root)
    paths = Paths(root)
    rp, tp = params.rounds, params.train
    prompts = get_prompt_set(params.sample.prompt_set, params.sample.num_prompts, root=root)
    pipe = load_pipeline(params.model.source, dtype=params.model.dtype, device=process_device(params, state),
                         revision=params.model.revision)
    base_sha = model_fingerprint(pipe)
    fingerprint = rounds_fingerprint(params, base_sha, code_sha256())
    # the main process removes what it does not resume, then every process resumes the same rounds
    done = gather_to_all(completed_rounds(paths.rounds, fingerprint, rp.count, say) if main else None, state)[0]
    evaluation = PolicyEvaluation(params, pipe, root, say, state)  # the base's samples: before any adapter exists
    judge = judge_scorer(params.label.judge, params.label.judge_args, params.label.jpeg_quality) if main else None
    method_cls = resolve(TRAIN_METHODS[tp.method])
    model = TrainableUNet(params, need_reference_copy=method_cls.needs_reference_copy, progress=lambda _: None,
                          pipe=pipe)
    if done:  # every process continues from the last complete round's weights and optimizer state
        last = round_dir(paths.rounds, done[-1]["round"])
        saved = load_checkpoint(last / "checkpoint" / "state", done[-1]["state_fingerprint"])
        if saved is None:
            raise RuntimeError(f"{last}: round.json is complete but its checkpoint/state is missing or other; "
                               f"remove {paths.rounds} to start over")
        model.load_weights(saved.weights)
        model.optimizer.load_state_dict(saved.optimizer)
        say(f"rounds: resuming after round {done[-1]['round']} ({len(done)} complete in {paths.rounds})")
    rows = [{"round": 0, "samples": 0, **evaluation.base_row()}] + [r["metrics"] for r in done]
    images_per_round = rp.groups_per_round * params.sample.images_per_group
    summary: dict[str, Any] = {}
    computed: list[int] = []
    began = time.time()

    def finish() -> None:
        nonlocal summary
        summary = _summary(params, rows, judge, began)
        write_curves(rows, summary, plot=paths.rounds_plot, eval_plot=paths.rounds_eval_plot,
                     metrics=paths.rounds_metrics)

    with tqdm(total=rp.count, initial=len(done), desc="rounds", unit="round", dynamic_ncols=True,
              disable=not main) as bar:
        for r in range(len(done) + 1, rp.count + 1):
            started = time.time()
            rdir = round_dir(paths.rounds, r)
            previous = round_dir(paths.rounds, r - 1) / "lora"
            if not main:  # the main process alone records the policy in the dataset
                policy = {}
            elif r > 1:
                policy = {"policy": f"round {r - 1}", "policy_lora": _relative(previous, root),
                          "policy_lora_sha256": tree_sha256(previous)}
            elif tp.init_lora:
                policy = {"policy": "train.init_lora", "policy_lora": tp.init_lora,
                          "policy_lora_sha256": tree_sha256(Path(tp.init_lora))}
            else:
                policy = {"policy": "base"}
            # 1. sample from the policy as it is now (round r-1's), shared as the sample stage shares it, 2. label
            group_prompts, seeds = round_prompts(prompts, rp.groups_per_round, params.sample.seed, r)
            write_trajectories(model.pipe, group_prompts, seeds, params, rdir / "trajectories", policy=policy,
                               base_sha256=base_sha, progress=lambda _: None)
            store = TrajectoryStore.open(rdir / "trajectories")
            if main:
                _label(store, judge, params, rdir / "preferences", derived_seed(params.label.simulated.seed, r))
            wait_for_everyone(state)  # the others read the labels the main process wrote
            preferences = PreferenceStore.open(rdir / "preferences")
            labels = preferences.summary()
            reward = mean_ci(_image_scores(preferences))
            row: dict[str, Any] = {"round": r, "samples": rows[-1]["samples"] + images_per_round,
                                   "pairs": labels.num_pairs - labels.num_ties, "ties": labels.num_ties,
                                   "sample_reward": reward.mean, "sample_reward_low": reward.low,
                                   "sample_reward_high": reward.high}
            evaluate_now = r % rp.eval_every == 0 or r == rp.count
            if evaluate_now:  # 3. the sampling policy against the base, on pairs it has not trained on
                row |= sampler_against_base(model, store, preferences, params, state)
            # 4. the update, with the round's own draws (train.seed and r)
            round_params = params.model_copy(update={"train": tp.model_copy(update={"seed": derived_seed(tp.seed, r)})})
            model.refresh_reference()  # previous_round: the policy this round starts from
            curve: list[dict[str, float]] = []
            if row["pairs"]:  # the same in every process: read from the same labels
                trained = fit(round_params, trajectories_dir=store.root, preferences_dir=preferences.root,
                              out_dir=rdir / "lora", checkpoint_dir=rdir / "checkpoint", model=model, snapshots=False,
                              progress=lambda _: None)
                curve = trained.curve
                row |= {f"train_{k}": v for k, v in trained.final.items()} | {"train_steps": trained.steps}
                state_fingerprint = _fit_fingerprint(round_params, preferences, store)
            else:  # every pair tied: nothing to prefer, the policy goes on unchanged
                say(f"round {r}: all {labels.num_pairs} pairs are ties; no update this round")
                if main:
                    model.save(rdir / "lora")
                    save_checkpoint(rdir / "checkpoint" / "state", fingerprint=NO_UPDATE, step=0,
                                    weights=model.weights(), optimizer_state=model.optimizer.state_dict(),
                                    precomputed={}, curve=[])
                state_fingerprint = NO_UPDATE
            if evaluate_now:  # 5. the policy after the update on the evaluation prompts
                row |= evaluation.of(model.pipe)
            row["seconds"] = round(time.time() - started, 2)
            rows.append(row)
            computed.append(r)
            if main:  # 6. record: round.json last, so the round counts as complete only once everything is written
                write_record(rdir, {"round": r, "fingerprint": fingerprint, "state_fingerprint": state_fingerprint,
                                    "policy": policy, "metrics": row, "train_curve": curve})
                finish()
                say(_round_line(row, rp.count))
                if on_round is not None:
                    on_round(row)
                bar.set_postfix(reward=f"{row['sample_reward']:.4g}")
                bar.update()
            wait_for_everyone(state)  # the round is on disk (the next one names its LoRA) when any process goes on
    if not main:
        return None
    if not summary:
        finish()
    draw_curves(rows, paths.rounds_figure, judge=params.eval_judge,
                title=f"{tp.method}, reference {tp.reference}: {rp.count} rounds of {images_per_round} images")
    return RoundsResult(rows=rows, summary=summary, resumed=len(done), computed=computed)


def _fit_fingerprint(params: Params, preferences, store) -> str:
    from prefdiff.training.fit import inputs_fingerprint

    return inputs_fingerprint(params, preferences, store)


def _round_line(row: dict[str, Any], count: int) -> str:
    line = (f"round {row['round']}/{count}: {row['samples']} images so far, reward of its samples "
            f"{row['sample_reward']:.4f}, {row['pairs']} pairs")
    if "train_loss" in row:
        line += f", loss {row['train_loss']:.4f}"
    if "eval_reward" in row:
        line += (f"; policy {row['eval_reward']:.4f}, win-rate vs base {row['win_rate']:.3f} "
                 f"[{row['win_rate_low']:.3f}, {row['win_rate_high']:.3f}], KL proxy {row['kl_proxy']:.4g}")
        if "implicit_acc" in row:
            line += f", implicit acc {row['implicit_acc']:.3f}"
    return line + f" ({row['seconds']:.1f} s)"


def _summary(params: Params, rows: list[dict[str, Any]], judge, began: float) -> dict[str, Any]:
    """metrics/rounds.json: the configuration in one line, the base, and the last evaluated round."""
    last = rows[-1]
    evaluated = [r for r in rows if r["round"] > 0 and "eval_reward" in r]
    out: dict[str, Any] = {"rounds": last["round"], "samples": last["samples"], "method": params.train.method,
                           "reference": params.train.reference, "judge": judge.name,
                           "eval_judge": params.eval_judge, "higher_is_better": bool(judge.higher_is_better),
                           "base_eval_reward": rows[0]["eval_reward"],
                           "seconds_this_run": round(time.time() - began, 1)}
    if evaluated:
        final = evaluated[-1]
        out |= {f"final_{k}": v for k, v in final.items() if k not in ("round", "samples")}
        out["final_round_evaluated"] = final["round"]
    return out


__all__ = ["PolicyEvaluation", "RoundsResult", "rounds_refusal", "run_rounds", "sampler_against_base"]
