"""Named prompt sets.

``animals45`` is the D3PO paper's list for the quantitative objectives (appendix C, 45 common animals);
``animals_heldout`` holds animals that are not in it, for evaluation on prompts never trained on.
"""

from __future__ import annotations

ANIMALS_45 = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf "
    "lizard beetle kangaroo fish butterfly shark whale dolphin squirrel mouse rat snake turtle frog chicken "
    "duck goose bee pig turkey fly llama camel gorilla bat ant hedgehog"
).split()

ANIMALS_HELDOUT = "owl penguin koala panda giraffe elephant octopus parrot crab peacock".split()

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    "animals45": tuple(ANIMALS_45),
    "animals_heldout": tuple(ANIMALS_HELDOUT),
}


def prompt_set_names() -> list[str]:
    return sorted(PROMPT_SETS)


def get_prompt_set(name: str, limit: int | None = None) -> list[str]:
    """The prompts of a named set (the first ``limit`` if given); unknown names list the valid ones."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; allowed: {', '.join(prompt_set_names())}")
    prompts = list(PROMPT_SETS[name])
    if limit is not None and limit > len(prompts):
        raise ValueError(f"num_prompts = {limit} but prompt set {name!r} has only {len(prompts)} prompts")
    return prompts[:limit]
