"""Property-based (hypothesis): malformed params, prompt files and dataset indexes give a clear error, never a crash.

"Clear" means the error type a stage turns into one ``error:`` line (``stages._common.user_errors``: ParamsError,
PromptSetError, DatasetError), each problem on one line naming the file or key; any other exception (KeyError,
TypeError, UnicodeDecodeError, JSONDecodeError, ...) is a traceback for the user and fails the test. Examples
are few and small so the module runs in well under a minute on one core; the seed is derandomized so a CI run is
reproducible (a failure prints the example to add to tests/test_bad_inputs.py).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefdiff.config import ParamsError, check_files, load_params, parse_params
from prefdiff.data import DatasetError
from prefdiff.prompts import PromptSetError, get_prompt_set

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "params.yaml").read_text())
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# JSON/YAML-like values: the shapes a hand-edited file can hold where a number, a name or a section belongs
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["1e12", ".nan", "nan", "inf", "-1", "0", "3e-5", "cuda", "file:", "file:x.txt", "auto"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def paths_of(tree: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested mapping (sections, keys, subsections)."""
    out = []
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.append((*prefix, key))
            out += paths_of(value, (*prefix, key))
    return out


PARAM_PATHS = paths_of(BASE)


def with_value(tree: dict, path: tuple, value: object, delete: bool) -> dict:
    tree = json.loads(json.dumps(tree))  # a deep copy (params.yaml holds only JSON types)
    node = tree
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


def assert_one_line_problems(err: ParamsError) -> None:
    assert err.problems and all("\n" not in p and p.strip() for p in err.problems), err.problems


@SETTINGS
@given(edits=st.lists(st.tuples(st.sampled_from(PARAM_PATHS), values, st.booleans()), min_size=1, max_size=3))
def test_any_edit_of_params_is_valid_or_a_params_error(edits):
    data = BASE
    for path, value, delete in edits:
        try:
            data = with_value(data, path, value, delete)
        except (KeyError, TypeError):  # an earlier edit replaced a parent of this path: skip this edit
            continue
    try:
        params = parse_params(data, "params.yaml")
    except ParamsError as err:
        assert_one_line_problems(err)
        return
    # what was accepted is finite wherever it is a float, and within the bounds the schema states
    for section in params.model_dump().values():
        for value in section.values() if isinstance(section, dict) else ():
            if isinstance(value, float):
                assert math.isfinite(value)


@SETTINGS
@given(raw=st.one_of(st.text(max_size=200).map(str.encode), st.binary(max_size=200),
                     st.builds(lambda v: yaml.safe_dump(v).encode(), values),
                     st.builds(lambda v: yaml.safe_dump({"train": v}).encode(), values)))
def test_any_params_file_is_valid_or_a_params_error(raw, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(raw)
    try:
        load_params(path)
    except ParamsError as err:
        assert_one_line_problems(err)


@SETTINGS
@given(content=st.one_of(st.binary(max_size=120), st.text(max_size=120).map(str.encode),
                         st.builds(lambda v: json.dumps(v).encode(), values)),
       suffix=st.sampled_from([".txt", ".tsv", ".csv", ".json", ".parquet", ".md", ""]),
       section=st.sampled_from(["sample", "evaluate"]),
       num_prompts=st.one_of(st.none(), st.integers(min_value=1, max_value=5)))
def test_any_prompt_file_gives_prompts_or_a_clear_error(content, suffix, section, num_prompts):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / f"prompts{suffix}").write_bytes(content)
        name = f"file:prompts{suffix}"
        try:
            prompts = get_prompt_set(name, root=root)
        except PromptSetError as err:
            assert "\n" not in str(err) and ("prompts" in str(err)), str(err)
        else:
            assert prompts and all(isinstance(p, str) and p == p.strip() and p for p in prompts)
        # the same file through the stages' first step: valid, or a ParamsError naming the key
        params = parse_params({**BASE, section: {**BASE[section], "prompt_set": name, "num_prompts": num_prompts}})
        try:
            check_files(params, root)
        except ParamsError as err:
            assert_one_line_problems(err)
            assert str(err).startswith(f"{section}.")


# -- dataset indexes ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    from test_bad_inputs import write_preferences_store

    ws = tmp_path_factory.mktemp("stores")
    write_preferences_store(ws)
    return ws / "data"


def mutations(index: dict) -> st.SearchStrategy:
    """A valid index changed at one key path: deleted, or replaced by any value."""
    return st.tuples(st.sampled_from(paths_of(index) + [(k, 0) for k, v in index.items() if isinstance(v, list)]),
                     values, st.booleans())


def mutate(index: dict, path: tuple, value: object, delete: bool) -> object:
    tree = json.loads(json.dumps(index))
    node = tree
    try:
        for part in path[:-1]:
            node = node[part]
        if delete and isinstance(node, dict):
            del node[path[-1]]
        else:
            node[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        pass
    return tree


def index_cases(store: str):
    def strategy(data: Path) -> st.SearchStrategy:
        index = json.loads((data / store / "index.json").read_text())
        raw = json.dumps(index).encode()
        return st.one_of(
            mutations(index).map(lambda m: json.dumps(mutate(index, *m)).encode()),
            st.integers(min_value=0, max_value=len(raw) - 1).map(lambda n: raw[:n]),  # truncated
            st.binary(max_size=64),  # garbage
            values.map(lambda v: json.dumps(v).encode()),  # valid JSON, not an index
        )
    return strategy


@pytest.mark.parametrize("store", ["trajectories", "preferences"])
def test_any_damaged_index_opens_or_is_a_dataset_error(store, datasets, tmp_path):
    from prefdiff.data.preferences import PreferenceStore
    from prefdiff.data.trajectories import TrajectoryStore

    copy = tmp_path / "data"
    shutil.copytree(datasets, copy)
    opener = {"trajectories": TrajectoryStore.open, "preferences": PreferenceStore.open}[store]
    opener(copy / store)  # the undamaged copy opens

    @SETTINGS
    @given(raw=index_cases(store)(copy))
    def check(raw: bytes) -> None:
        (copy / store / "index.json").write_bytes(raw)
        try:
            opener(copy / store)
        except DatasetError as err:
            assert "\n" not in str(err) and str(copy / store) in str(err), str(err)

    check()
