"""The champion gate as a pure function: hand cases for the rule, and refusal across evaluation protocols."""

import math

import pytest

from evaluation.evaluate import evaluation_protocol, protocol_fingerprint
from prefdiff.config import parse_params
from prefdiff.gate import CHALLENGER, PROMOTE, RE_EVALUATE, Candidate, GateRule, Incumbent, decide
from prefdiff.labeling.pairs import judge_scorer

RULE = GateRule(metric="trained_mean_reward", base_metric="base_mean_reward", min_improvement=0.05)
P = "a" * 64


def _cand(value, base=0.0, protocol=P, baseline_version=None, win_rate_low=0.6):
    return Candidate(value=value, protocol=protocol, baseline_value=base, baseline_version=baseline_version,
                     win_rate_low=win_rate_low)


def _champ(value, version=1, protocol=P, metric="trained_mean_reward"):
    return Incumbent(version=version, value=value, metric=metric, protocol=protocol)


def test_same_protocol_promotes_only_past_the_margin():
    d = decide(_cand(1.06), _champ(1.0), RULE)
    assert (d.action, d.compared_to, d.compared_with, d.promote) == (PROMOTE, 1.0, "champion v1", True)
    d = decide(_cand(1.04), _champ(1.0), RULE)  # 1.04 <= 1.0 + 0.05
    assert (d.action, d.compared_to, d.promote) == (CHALLENGER, 1.0, False)
    assert "does not beat champion v1 1.0 by more than 0.05" in d.reason
    # no champion: the bar is the base model's score in the same evaluation
    assert decide(_cand(0.52, base=0.5), None, RULE).action == CHALLENGER
    d = decide(_cand(0.56, base=0.5), None, RULE)
    assert (d.action, d.compared_to, d.compared_with) == (PROMOTE, 0.5, "base")
    d = decide(_cand(-7.0), None, GateRule("trained_mean_reward", None))
    assert (d.action, d.compared_to, d.compared_with) == (PROMOTE, None, "none")


def _protocol(**label):
    params = parse_params({"label": label, "evaluate": {"num_prompts": 2, "seeds_per_prompt": 2}})
    judge = judge_scorer(params.eval_judge, params.label.judge_args, params.label.jpeg_quality)
    return protocol_fingerprint(evaluation_protocol(params, ["a cat", "a cat", "a dog", "a dog"], [1, 2, 3, 4], judge))


def test_switching_the_judge_makes_the_comparison_cross_protocol_and_refused():
    jpeg = _protocol(judge="jpeg_compressibility")
    assert jpeg == _protocol(judge="jpeg_compressibility")  # a pure function of the protocol
    other_judge = _protocol(judge="jpeg_incompressibility")
    other_args = _protocol(judge="jpeg_compressibility", jpeg_quality=80)
    assert len({jpeg, other_judge, other_args}) == 3
    # a far better number under another judge still cannot dethrone the champion
    d = decide(_cand(1e6, protocol=other_judge), _champ(-3.0, protocol=jpeg), RULE)
    assert (d.action, d.compared_to, d.compared_with, d.promote) == (RE_EVALUATE, None, "none", False)
    assert f"protocol {jpeg[:12]}" in d.reason and other_judge[:12] in d.reason
    assert "evaluate.baseline: champion" in d.reason
    # a champion registered before fingerprints existed is not comparable either
    assert decide(_cand(1e6), _champ(-3.0, protocol=None), RULE).action == RE_EVALUATE
    # nor one gated on another metric
    d = decide(_cand(1e6), _champ(-3.0, metric="win_rate"), RULE)
    assert d.action == RE_EVALUATE and "gated on 'win_rate'" in d.reason


def test_cross_protocol_candidate_is_gated_on_the_champion_scored_in_its_own_evaluation():
    # this evaluation had champion v4 as its baseline: v4 scored 21.2, the candidate 21.3 (one protocol)
    d = decide(_cand(21.3, base=21.2, protocol="b" * 64, baseline_version=4), _champ(-3.0, version=4), RULE)
    assert (d.action, d.compared_to, d.compared_with) == (PROMOTE, 21.2, "champion v4 (re-evaluated)")
    d = decide(_cand(21.22, base=21.2, protocol="b" * 64, baseline_version=4), _champ(-3.0, version=4), RULE)
    assert (d.action, d.compared_to) == (CHALLENGER, 21.2)
    # the baseline was another version than the incumbent: still not comparable
    d = decide(_cand(21.3, base=21.2, protocol="b" * 64, baseline_version=3), _champ(-3.0, version=4), RULE)
    assert d.action == RE_EVALUATE


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused_naming_them(value):
    """A NaN compares false with everything: as a metric it would silently never promote, as a margin it
    would silently never let anything promote. The gate refuses it (GateInputError, a ValueError), naming
    which number."""
    for incumbent, rule in ((None, GateRule("trained_mean_reward", None)), (None, RULE), (_champ(-1e9), RULE)):
        with pytest.raises(ValueError, match=r"the gate metric 'trained_mean_reward' is (nan|inf|-inf)"):
            decide(_cand(value, base=-1e9), incumbent, rule)
    with pytest.raises(ValueError, match="the base metric 'base_mean_reward' is"):
        decide(_cand(1.0, base=value), None, RULE)
    with pytest.raises(ValueError, match="register.min_improvement is"):
        decide(_cand(1.0), _champ(0.0), GateRule("trained_mean_reward", "base_mean_reward", min_improvement=value))
    with pytest.raises(ValueError, match="register.min_win_rate_low is"):
        decide(_cand(1.0), None, GateRule("trained_mean_reward", None, min_win_rate_low=value))
    with pytest.raises(ValueError, match="'win_rate_low' is"):
        decide(_cand(1.0, win_rate_low=value), None, GateRule("trained_mean_reward", None, min_win_rate_low=0.5))
    with pytest.raises(ValueError, match="champion v1's stored gate value is"):
        decide(_cand(1.0), _champ(value), RULE)
    # a win-rate bound the rule does not use is not the gate's business
    assert decide(_cand(1.0, win_rate_low=value), None, GateRule("trained_mean_reward", None)).action == PROMOTE


def test_bootstrap_lower_bound_requirement():
    rule = GateRule("trained_mean_reward", "base_mean_reward", 0.0, min_win_rate_low=0.5)
    assert decide(_cand(1.0, win_rate_low=0.55), None, rule).action == PROMOTE
    d = decide(_cand(1.0, win_rate_low=0.5), None, rule)
    assert d.action == CHALLENGER and "bootstrap lower bound 0.5 is not above 0.5" in d.reason
    assert decide(_cand(1.0, win_rate_low=None), None, rule).action == CHALLENGER


def test_without_incumbent_the_bar_names_the_evaluations_baseline():
    # the alias was removed after this evaluation used champion v2 as its baseline: the bar is v2's score here
    d = decide(_cand(1.3, base=1.2, baseline_version=2), None, RULE)
    assert (d.action, d.compared_to, d.compared_with) == (PROMOTE, 1.2, "v2 (this evaluation's baseline)")
