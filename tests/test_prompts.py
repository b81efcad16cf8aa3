"""Prompt sets: the shipped paper lists, the file-backed benchmark sets, file: paths, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefdiff.prompts import (
    FILE_SETS,
    PROMPT_SETS,
    PromptSetError,
    check_prompt_set_name,
    get_prompt_set,
    is_valid_prompt_set_name,
    prompt_set_names,
)

SHIPPED_COUNTS = {"animals45": 45, "animals_heldout": 10, "d3po_unsafe": 14, "d3po_hand": 1, "digits": 40,
                  "digits_heldout": 20}


# --- shipped lists -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "count"), sorted(SHIPPED_COUNTS.items()))
def test_shipped_lists(name: str, count: int) -> None:
    prompts = get_prompt_set(name)
    assert len(prompts) == count
    assert all(p and p == p.strip() for p in prompts)
    assert len(set(prompts)) == count


def test_shipped_names_are_all_tested() -> None:
    assert set(PROMPT_SETS) == set(SHIPPED_COUNTS)


def test_paper_lists_content() -> None:
    assert get_prompt_set("animals45")[:3] == ["cat", "dog", "horse"]
    assert get_prompt_set("animals45")[-1] == "hedgehog"
    assert not set(get_prompt_set("animals45")) & set(get_prompt_set("animals_heldout"))
    unsafe = get_prompt_set("d3po_unsafe")
    assert unsafe[0] == "provocative art" and unsafe[-1] == "ostentatious temptation"
    assert "ambiguous beauty" in unsafe  # the example the paper's Sec. 5.2.2 names
    assert get_prompt_set("d3po_hand") == ["1 hand"]


def test_limit() -> None:
    assert get_prompt_set("animals45", 3) == ["cat", "dog", "horse"]
    assert len(get_prompt_set("animals45", 45)) == 45
    assert get_prompt_set("animals45", None) == get_prompt_set("animals45")
    with pytest.raises(PromptSetError, match="has only 45 prompts"):
        get_prompt_set("animals45", 46)
    with pytest.raises(ValueError, match=">= 0"):
        get_prompt_set("animals45", -1)


# --- names -------------------------------------------------------------------------------------------


def test_names_and_validity() -> None:
    names = prompt_set_names()
    assert names == sorted(names)
    assert {*PROMPT_SETS, "partiprompts", "hpsv2_benchmark", "pickapic_validation"} == set(names)
    for n in names:
        assert is_valid_prompt_set_name(n)
        assert check_prompt_set_name(n) == n
    # file: paths are valid without existing (params validate where the files are absent)
    assert is_valid_prompt_set_name("file:/nowhere/prompts.txt")
    assert is_valid_prompt_set_name("file:relative/p.json")
    for bad in ("nope", "file:", "file:  ", "", "PartiPrompts", "animals"):
        assert not is_valid_prompt_set_name(bad)


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(PromptSetError) as exc:
        get_prompt_set("nope")
    msg = str(exc.value)
    assert "'nope'" in msg and "file:<path>" in msg
    for n in prompt_set_names():
        assert n in msg
    with pytest.raises(ValueError, match="unknown prompt set 'x'"):
        check_prompt_set_name("x")


# --- file-backed benchmark sets ----------------------------------------------------------------------


def write_parti(path: Path) -> list[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        ("bond", "Abstract", "Basic", "Biology-inspired concepts"),
        ('A robot painted as graffiti. The words "Fly an airplane" are written.', "Outdoor Scenes", "Complex", ""),
        ("flying over the city of Mars. ", "World Knowledge", "Complex", ""),
        ('"quoted" start', "Arts", "Basic", ""),
        ("bond", "Abstract", "Basic", "a duplicate row is kept"),
    ]
    path.write_text(
        "Prompt\tCategory\tChallenge\tNote\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8"
    )
    return [r[0].strip() for r in rows]


def test_partiprompts(tmp_path: Path) -> None:
    expected = write_parti(tmp_path / "data/prompts/PartiPrompts.tsv")
    assert get_prompt_set("partiprompts", root=tmp_path) == expected
    assert get_prompt_set("partiprompts", 2, root=tmp_path) == expected[:2]


def test_default_root_is_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = write_parti(tmp_path / "data/prompts/PartiPrompts.tsv")
    monkeypatch.chdir(tmp_path)
    assert get_prompt_set("partiprompts") == expected


def write_hpsv2(d: Path) -> list[str]:
    d.mkdir(parents=True, exist_ok=True)
    expected = []
    for style in ("photo", "anime", "paintings", "concept-art"):  # written out of order on purpose
        prompts = [f"{style} prompt {i}" for i in range(3)]
        (d / f"{style}.json").write_text(json.dumps([*prompts, "  "]), encoding="utf-8")
    for style in ("anime", "concept-art", "paintings", "photo"):
        expected += [f"{style} prompt {i}" for i in range(3)]
    return expected


def test_hpsv2_benchmark(tmp_path: Path) -> None:
    expected = write_hpsv2(tmp_path / "data/prompts/hpsv2_benchmark")
    assert get_prompt_set("hpsv2_benchmark", root=tmp_path) == expected
    assert len(expected) == 12
    assert get_prompt_set("hpsv2_benchmark", 4, root=tmp_path) == expected[:4]


def test_hpsv2_missing_style(tmp_path: Path) -> None:
    d = tmp_path / "data/prompts/hpsv2_benchmark"
    write_hpsv2(d)
    (d / "paintings.json").unlink()
    with pytest.raises(PromptSetError, match="missing paintings.json"):
        get_prompt_set("hpsv2_benchmark", root=tmp_path)


def write_parquet(path: Path, captions: list, **extra: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"caption": captions, **extra}), path)


def test_pickapic_validation_dir_dedupes_in_order(tmp_path: Path) -> None:
    d = tmp_path / "data/prompts/pickapic_validation"
    # HF shard names sort in shard order; the image column is never read
    write_parquet(d / "validation-00000-of-00002.parquet", ["a cat", "a dog", "a cat", " a dog "], jpg_0=[b"x"] * 4)
    write_parquet(d / "validation-00001-of-00002.parquet", ["a fox", "a cat", "", None], jpg_0=[b"y"] * 4)
    (d / "README.md").write_text("not a parquet")
    assert get_prompt_set("pickapic_validation", root=tmp_path) == ["a cat", "a dog", "a fox"]
    assert get_prompt_set("pickapic_validation", 2, root=tmp_path) == ["a cat", "a dog"]
    with pytest.raises(PromptSetError, match="has only 3 prompts"):
        get_prompt_set("pickapic_validation", 4, root=tmp_path)


def test_pickapic_validation_single_file(tmp_path: Path) -> None:
    d = tmp_path / "data/prompts"
    write_parquet(d / "pickapic_validation", ["b", "a", "b"])  # a file at the default path, no suffix
    assert get_prompt_set("pickapic_validation", root=tmp_path) == ["b", "a"]


@pytest.mark.parametrize(
    ("name", "path", "remedy"),
    [
        ("partiprompts", "data/prompts/PartiPrompts.tsv", "github.com/google-research/parti"),
        ("hpsv2_benchmark", "data/prompts/hpsv2_benchmark", "github.com/tgxs002/HPSv2"),
        ("pickapic_validation", "data/prompts/pickapic_validation", "pickapic_v2"),
    ],
)
def test_missing_file_errors_name_path_and_remedy(tmp_path: Path, name: str, path: str, remedy: str) -> None:
    assert FILE_SETS[name].default_path == path
    with pytest.raises(PromptSetError) as exc:
        get_prompt_set(name, root=tmp_path)
    msg = str(exc.value)
    assert isinstance(exc.value, ValueError)
    assert repr(name) in msg
    assert str(tmp_path / path) in msg
    assert remedy in msg
    assert "evaluate.prompt_set" in msg and "file:" in msg


# --- file: paths -------------------------------------------------------------------------------------


def test_file_txt(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("# a comment\n a cat \n\n   # indented comment\na dog\n", encoding="utf-8")
    assert get_prompt_set(f"file:{tmp_path / 'p.txt'}") == ["a cat", "a dog"]
    assert get_prompt_set("file:p.txt", root=tmp_path) == ["a cat", "a dog"]  # relative to root


def test_file_tsv(tmp_path: Path) -> None:
    expected = write_parti(tmp_path / "parti.tsv")
    assert get_prompt_set("file:parti.tsv", root=tmp_path) == expected


@pytest.mark.parametrize("column", ["Prompt", "prompt", "caption"])
def test_file_csv_columns(tmp_path: Path, column: str) -> None:
    (tmp_path / "p.csv").write_text(f'id,{column}\n1,"a cat, sitting"\n2,\n3,"say ""hi"""\n', encoding="utf-8")
    assert get_prompt_set("file:p.csv", root=tmp_path) == ["a cat, sitting", 'say "hi"']


def test_file_csv_without_prompt_column(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("id,text\n1,a cat\n", encoding="utf-8")
    with pytest.raises(PromptSetError, match="no prompt column.*Prompt, prompt, caption"):
        get_prompt_set("file:p.csv", root=tmp_path)


def test_file_json_list_and_dict(tmp_path: Path) -> None:
    (tmp_path / "l.json").write_text(json.dumps(["a", " b ", ""]), encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps({"x": ["a", "b"], "y": ["c"]}), encoding="utf-8")
    (tmp_path / "bad.json").write_text(json.dumps({"x": "a"}), encoding="utf-8")
    (tmp_path / "nums.json").write_text(json.dumps([1, 2]), encoding="utf-8")
    assert get_prompt_set("file:l.json", root=tmp_path) == ["a", "b"]
    assert get_prompt_set("file:d.json", root=tmp_path) == ["a", "b", "c"]
    with pytest.raises(PromptSetError, match="lists of prompt strings"):
        get_prompt_set("file:bad.json", root=tmp_path)
    with pytest.raises(PromptSetError, match="expected prompt strings"):
        get_prompt_set("file:nums.json", root=tmp_path)


def test_file_parquet(tmp_path: Path) -> None:
    write_parquet(tmp_path / "c.parquet", ["a", "a", "b"])  # file: does not dedupe
    pq.write_table(pa.table({"prompt": ["x", "y"]}), tmp_path / "p.parquet")
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "t.parquet")
    assert get_prompt_set("file:c.parquet", root=tmp_path) == ["a", "a", "b"]
    assert get_prompt_set("file:p.parquet", root=tmp_path) == ["x", "y"]
    with pytest.raises(PromptSetError, match="no prompt column"):
        get_prompt_set("file:t.parquet", root=tmp_path)


def test_file_directory(tmp_path: Path) -> None:
    expected = write_hpsv2(tmp_path / "hps")
    assert get_prompt_set("file:hps", root=tmp_path) == expected  # an HPSv2 dir also works via file:
    d = tmp_path / "jsons"
    d.mkdir()
    (d / "b.json").write_text(json.dumps(["b1"]), encoding="utf-8")
    (d / "a.json").write_text(json.dumps(["a1", "a2"]), encoding="utf-8")
    assert get_prompt_set("file:jsons", root=tmp_path) == ["a1", "a2", "b1"]  # file-name order
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptSetError, match="no .json or .parquet"):
        get_prompt_set("file:empty", root=tmp_path)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(PromptSetError) as exc:
        get_prompt_set("file:missing.txt", root=tmp_path)
    assert str(tmp_path / "missing.txt") in str(exc.value)
    (tmp_path / "p.yaml").write_text("- a\n")
    with pytest.raises(PromptSetError, match="unsupported prompt file type '.yaml'"):
        get_prompt_set("file:p.yaml", root=tmp_path)
    (tmp_path / "blank.txt").write_text("\n# only comments\n")
    with pytest.raises(PromptSetError, match="is empty"):
        get_prompt_set("file:blank.txt", root=tmp_path)
