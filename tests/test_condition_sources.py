"""Condition sources (rewardtune/condition_sources.py): the four kinds of the [conditions] table, their file formats and
one-line errors, the held-out split, and the draws (sample, sample_groups, evaluation_conditions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rewardtune.condition_sources import (
    LabelSource,
    PromptSource,
    build_condition_source,
    resolve_condition_options,
)
from rewardtune.conditions import Conditions
from rewardtune.errors import RecipeError

PROMPTS = [f"a photo of object {i}" for i in range(10)]
GENEVAL = [  # GenEval's evaluation_metadata.jsonl layout: metadata at top level
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [], "prompt": "a photo of two dogs"},
    {"prompt": "a red ball", "metadata": {"tag": "colors", "include": [{"class": "ball", "color": "red"}]}},
]


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


class DataWithLabels:
    num_classes = 4

    def sample_conditioned(self, n, generator=None, device="cpu"):
        return torch.zeros(n, 2), Conditions.from_labels(torch.zeros(n, dtype=torch.long))


class DataWithoutLabels(DataWithLabels):
    num_classes = None  # like an image folder: sample_conditioned exists but there is nothing to condition on


# ---------------------------------------------------------------------------------------------------------------------
# each kind parses
# ---------------------------------------------------------------------------------------------------------------------
def test_labels_uniform(tmp_path):
    source = build_condition_source({"kind": "labels", "num_classes": 4}, base_dir=tmp_path)
    assert isinstance(source, LabelSource)
    assert (source.kind, source.num_classes, source.from_data) == ("labels", 4, False)
    assert source.train_keys == ("class 0", "class 1", "class 2", "class 3") and source.held_out_keys == ()
    labels = source.sample(200, generator()).labels
    assert labels.dtype == torch.long and labels.shape == (200,)
    assert set(labels.tolist()) == {0, 1, 2, 3}  # P(a class missing in 200 draws) < 4 * 0.75**200


def test_labels_class_names_and_data_distribution(tmp_path):
    names = ["zero", "one", "two", "three"]
    options = {"kind": "labels", "num_classes": 4, "distribution": "data", "class_names": names}
    source = build_condition_source(options, base_dir=tmp_path, data=DataWithLabels())
    assert source.from_data and source.train_keys == tuple(names)
    with pytest.raises(ValueError, match="sample_conditioned"):
        source.sample(3, generator())
    assert source.evaluation_conditions("train", 2).labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize(
    ("options", "data", "match"),
    [
        ({"num_classes": 1}, None, r"conditions\.num_classes: must be >= 2"),
        ({"num_classes": 3, "distribution": "data"}, None, r"conditions\.distribution: 'data' needs data"),
        ({"num_classes": 3, "distribution": "data"}, DataWithLabels(), r"conditions\.num_classes: 3, but the data"),
        ({"num_classes": 4, "distribution": "data"}, DataWithoutLabels(), r"conditions\.distribution: .* have none"),
        ({"num_classes": 3, "distribution": "zipf"}, None, r"conditions\.distribution: must be 'uniform' or 'data'"),
        ({"num_classes": 3, "class_names": ["a", "b"]}, None, r"conditions\.class_names: 2 names"),
        ({"num_classes": 3, "held_out": 0.5}, None, r"conditions\.held_out: unknown key for kind 'labels'"),
        ({"num_classes": "ten"}, None, r"conditions\.num_classes: expected an integer, got 'ten'"),
        ({"num_classes": True}, None, r"conditions\.num_classes: expected an integer"),
        ({}, None, r"conditions\.num_classes: missing"),
    ],
)
def test_label_errors(tmp_path, options, data, match):
    with pytest.raises(RecipeError, match=match):
        build_condition_source({"kind": "labels", **options}, base_dir=tmp_path, data=data)


def test_prompts_in_the_recipe(tmp_path):
    source = build_condition_source({"kind": "prompts", "prompts": ["a cat ", "a dog", "a cat"]}, base_dir=tmp_path)
    assert isinstance(source, PromptSource) and source.kind == "prompts"
    assert source.train_keys == ("a cat", "a dog")  # stripped; the repeat is kept once
    assert source.num_classes is None and not source.from_data


def test_prompt_file(tmp_path):
    write(tmp_path, "prompts.txt", "  a cat\na dog\r\na cat\na bird\n")  # CRLF, a repeat, a final newline
    source = build_condition_source({"kind": "prompt_file", "path": "prompts.txt"}, base_dir=tmp_path)
    assert source.train_keys == ("a cat", "a dog", "a bird")
    assert source.split("train").metadata is None


def test_prompt_file_without_final_newline_and_with_bom(tmp_path):
    write(tmp_path, "prompts.txt", "\ufeffa cat\na dog".encode())
    source = build_condition_source({"kind": "prompt_file", "path": str(tmp_path / "prompts.txt")}, base_dir=Path("/"))
    assert source.train_keys == ("a cat", "a dog")


def test_jsonl_metadata_top_level_and_nested(tmp_path):
    write(tmp_path, "meta.jsonl", jsonl(GENEVAL))
    source = build_condition_source(
        {"kind": "jsonl", "path": "meta.jsonl"}, base_dir=tmp_path, metadata_keys={"tag", "include", "exclude"}
    )
    rows = source.split("train")
    assert rows.prompts == ("a photo of a cat", "a photo of two dogs", "a red ball")
    assert rows.metadata[0] == {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    assert rows.metadata[1]["exclude"] == []
    assert rows.metadata[2] == {"tag": "colors", "include": [{"class": "ball", "color": "red"}]}
    assert source.sample(5, generator()).metadata is not None


# ---------------------------------------------------------------------------------------------------------------------
# file errors: one line naming key, file, line
# ---------------------------------------------------------------------------------------------------------------------
def test_empty_line_in_the_middle(tmp_path):
    write(tmp_path, "prompts.txt", "a cat\na dog\n   \na bird\n")
    with pytest.raises(RecipeError, match=r"^conditions\.path: prompts\.txt line 3 is empty$"):
        build_condition_source({"kind": "prompt_file", "path": "prompts.txt"}, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", r"prompts\.txt is empty"),
        (b"a cat\na \xff dog\n", r"prompts\.txt line 2 is not UTF-8"),
    ],
)
def test_prompt_file_errors(tmp_path, content, match):
    write(tmp_path, "prompts.txt", content)
    with pytest.raises(RecipeError, match=r"^conditions\.path: " + match):
        build_condition_source({"kind": "prompt_file", "path": "prompts.txt"}, base_dir=tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match=r"conditions\.path: nope\.txt does not exist"):
        build_condition_source({"kind": "prompt_file", "path": "nope.txt"}, base_dir=tmp_path)


def test_jsonl_unknown_metadata_key(tmp_path):
    write(tmp_path, "meta.jsonl", jsonl(GENEVAL[:1] + [{"prompt": "a blue cup", "colour": "blue"}]))
    with pytest.raises(RecipeError) as err:
        build_condition_source(
            {"kind": "jsonl", "path": "meta.jsonl"}, base_dir=tmp_path, metadata_keys={"tag", "include"}
        )
    message = str(err.value)
    assert message.startswith("conditions.path: meta.jsonl line 2: metadata key 'colour'") and "\n" not in message
    build_condition_source({"kind": "jsonl", "path": "meta.jsonl"}, base_dir=tmp_path)  # no declared keys: any


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"prompt": "a cat",', r"line 2: malformed JSON"),
        ('["a cat"]', r"line 2: expected a JSON object, got list"),
        ('{"tag": "x"}', r"line 2: needs a non-empty string \"prompt\""),
        ('{"prompt": "  "}', r"line 2: needs a non-empty string \"prompt\""),
        ('{"prompt": "a", "metadata": 3}', r"line 2: \"metadata\" must be an object"),
        ('{"prompt": "a", "tag": 1, "metadata": {"tag": 2}}', r"line 2: metadata key 'tag' is both"),
        ('{"prompt": "a photo of a cat", "tag": "other"}', r"line 2 repeats the prompt of line 1 with other metadata"),
    ],
)
def test_jsonl_errors(tmp_path, line, match):
    write(tmp_path, "meta.jsonl", jsonl(GENEVAL[:1]) + line + "\n")
    with pytest.raises(RecipeError, match=r"^conditions\.path: meta\.jsonl " + match):
        build_condition_source({"kind": "jsonl", "path": "meta.jsonl"}, base_dir=tmp_path)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"kind": "prompts", "prompts": ["a"], "promts": []}, r"conditions\.promts: unknown key .*'prompts'\?"),
        ({"kind": "prompt", "prompts": ["a"]}, r"conditions\.kind: unknown kind 'prompt'"),
        ({"prompts": ["a"]}, r"conditions\.kind: missing"),
        ({"kind": "prompts", "prompts": "a cat"}, r"conditions\.prompts: expected a list of strings"),
        ({"kind": "prompts", "prompts": []}, r"conditions\.prompts: the list is empty"),
        ({"kind": "prompts", "prompts": ["a", ""]}, r"conditions\.prompts: prompt 1 is empty"),
        ({"kind": "prompts", "prompts": ["a", "b"], "held_out": 1.0}, r"conditions\.held_out: a fraction in \[0, 1\)"),
        ({"kind": "prompts", "prompts": ["a", "b"], "held_out": 0.5, "split_seed": 1.5}, r"conditions\.split_seed"),
        ({"kind": "prompts", "prompts": ["a"], "held_out": 0.5}, r"conditions\.held_out: .* leaves none for training"),
        ({"kind": "prompts", "prompts": ["a"], "held_out_path": "b.txt"}, r"conditions\.held_out_path: unknown key"),
    ],
)
def test_option_errors(tmp_path, options, match):
    with pytest.raises(RecipeError, match=match):
        build_condition_source(options, base_dir=tmp_path)


def test_resolved_options_fill_defaults_and_round_trip(tmp_path):
    resolved = resolve_condition_options({"kind": "prompt_file", "path": "p.txt"})
    assert resolved == {"kind": "prompt_file", "path": "p.txt", "held_out": 0.0, "split_seed": 0, "held_out_path": ""}
    write(tmp_path, "p.txt", "a\nb\n")
    assert build_condition_source(resolved, base_dir=tmp_path).train_keys == ("a", "b")


# ---------------------------------------------------------------------------------------------------------------------
# held-out split
# ---------------------------------------------------------------------------------------------------------------------
def test_held_out_fraction_is_deterministic_disjoint_and_ordered(tmp_path):
    options = {"kind": "prompts", "prompts": PROMPTS, "held_out": 0.3, "split_seed": 7}
    first, again = (build_condition_source(options, base_dir=tmp_path) for _ in range(2))
    assert first.held_out_keys == again.held_out_keys and first.train_keys == again.train_keys
    assert len(first.held_out_keys) == 3 and len(first.train_keys) == 7
    assert set(first.held_out_keys).isdisjoint(first.train_keys)
    assert set(first.held_out_keys) | set(first.train_keys) == set(PROMPTS)
    for keys in (first.train_keys, first.held_out_keys):  # both keep the order of the list
        assert list(keys) == sorted(keys, key=PROMPTS.index)
    splits = {build_condition_source({**options, "split_seed": s}, base_dir=tmp_path).held_out_keys for s in range(4)}
    assert len(splits) > 1  # the seed matters (seeds 0..3 give 4 different splits of C(10, 3) = 120)


def test_small_held_out_fraction_holds_out_one(tmp_path):
    source = build_condition_source({"kind": "prompts", "prompts": PROMPTS, "held_out": 0.01}, base_dir=tmp_path)
    assert len(source.held_out_keys) == 1


def test_held_out_path(tmp_path):
    write(tmp_path, "train.txt", "a cat\na dog\n")
    write(tmp_path, "test.txt", "a bird\n")
    options = {"kind": "prompt_file", "path": "train.txt", "held_out_path": "test.txt"}
    source = build_condition_source(options, base_dir=tmp_path)
    assert source.train_keys == ("a cat", "a dog") and source.held_out_keys == ("a bird",)
    write(tmp_path, "test.txt", "a bird\na dog\n")
    with pytest.raises(RecipeError, match=r"conditions\.held_out_path: 1 prompt\(s\) are also training prompts"):
        build_condition_source(options, base_dir=tmp_path)
    with pytest.raises(RecipeError, match=r"conditions\.held_out: set held_out .* or held_out_path"):
        build_condition_source({**options, "held_out": 0.5}, base_dir=tmp_path)
    write(tmp_path, "test.txt", "a bird\n\n")
    with pytest.raises(RecipeError, match=r"^conditions\.held_out_path: test\.txt line 2 is empty$"):
        build_condition_source(options, base_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# draws
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def split_source(tmp_path) -> PromptSource:
    return build_condition_source({"kind": "prompts", "prompts": PROMPTS, "held_out": 0.3}, base_dir=tmp_path)


def test_sample_draws_train_prompts_reproducibly(split_source):
    drawn = split_source.sample(500, generator(3))
    assert len(drawn) == 500 and set(drawn.prompts) == set(split_source.train_keys)  # all 7 appear in 500 draws
    assert split_source.sample(500, generator(3)).prompts == drawn.prompts
    assert split_source.sample(500, generator(4)).prompts != drawn.prompts


def test_sample_continues_the_generator_state(split_source):
    """Two draws from one generator equal one draw of the joint size: only the generator's state matters."""
    g = generator(5)
    halves = split_source.sample(6, g).prompts + split_source.sample(6, g).prompts
    assert halves == split_source.sample(12, generator(5)).prompts


def test_sample_groups_layout(split_source):
    groups = split_source.sample_groups(4, 3, generator(1))
    assert len(groups) == 12
    prompts = [groups.prompts[i : i + 3] for i in range(0, 12, 3)]  # [num_groups][group_size]
    assert all(len(set(group)) == 1 for group in prompts)
    assert all(group[0] in split_source.train_keys for group in prompts)
    assert split_source.sample_groups(4, 3, generator(1)).prompts == groups.prompts


def test_label_groups(tmp_path):
    source = build_condition_source({"kind": "labels", "num_classes": 5}, base_dir=tmp_path)
    labels = source.sample_groups(6, 2, generator(0)).labels.view(6, 2)  # [num_groups, group_size]
    assert torch.equal(labels[:, 0], labels[:, 1])


def test_evaluation_conditions_order_and_counts(split_source):
    train = split_source.evaluation_conditions("train", 3)
    assert train.prompts == tuple(p for p in split_source.train_keys for _ in range(3))
    held_out = split_source.evaluation_conditions("held_out", 2)
    assert held_out.prompts == tuple(p for p in split_source.held_out_keys for _ in range(2))
    with pytest.raises(ValueError, match="per_condition"):
        split_source.evaluation_conditions("train", 0)


def test_evaluation_conditions_without_held_out(tmp_path):
    source = build_condition_source({"kind": "labels", "num_classes": 3}, base_dir=tmp_path)
    with pytest.raises(ValueError, match="no held-out conditions"):
        source.evaluation_conditions("held_out", 1)


def test_jsonl_metadata_follows_its_prompt(tmp_path):
    write(tmp_path, "meta.jsonl", jsonl(GENEVAL))
    source = build_condition_source({"kind": "jsonl", "path": "meta.jsonl"}, base_dir=tmp_path)
    tags = {r["prompt"]: r.get("tag", r.get("metadata", {}).get("tag")) for r in GENEVAL}
    drawn = source.sample_groups(5, 2, generator(2))
    assert [m["tag"] for m in drawn.metadata] == [tags[p] for p in drawn.prompts]


def test_balance_by_draws_each_metadata_value_equally_often(tmp_path):
    records = [{"prompt": f"a thing {i}", "tag": "many"} for i in range(9)] + [{"prompt": "a rare thing", "tag": "rare"}]
    write(tmp_path, "meta.jsonl", jsonl(records))
    source = build_condition_source({"kind": "jsonl", "path": "meta.jsonl", "balance_by": "tag"}, base_dir=tmp_path)
    torch.testing.assert_close(source.weights, torch.tensor([1 / 18] * 9 + [0.5], dtype=torch.float64))
    drawn = source.sample(4000, generator(0))
    rare = sum(meta["tag"] == "rare" for meta in drawn.metadata) / 4000
    assert abs(rare - 0.5) < 0.04  # 0.1 without balancing; std of the estimate 0.008
    groups = source.sample_groups(3, 4, generator(1))
    assert all(len(set(groups.prompts[g * 4 : g * 4 + 4])) == 1 for g in range(3))
    plain = build_condition_source({"kind": "jsonl", "path": "meta.jsonl"}, base_dir=tmp_path)
    assert plain.weights is None and list(plain.sample(5, generator(0)).prompts) == [
        records[i]["prompt"] for i in torch.randint(0, 10, (5,), generator=generator(0)).tolist()
    ]  # unbalanced draws are the uniform draws they always were


@pytest.mark.parametrize(
    "records, match",
    [
        ([{"prompt": "a", "tag": "x"}, {"prompt": "b"}], "prompt 'b' has no metadata key 'tag'"),
        ([{"prompt": "a", "other": 1}], "prompt 'a' has no metadata key 'tag'"),
    ],
)
def test_balance_by_a_key_a_prompt_lacks_is_a_recipe_error(tmp_path, records, match):
    write(tmp_path, "meta.jsonl", jsonl(records))
    with pytest.raises(RecipeError, match=f"conditions.balance_by: .*{match}"):
        build_condition_source({"kind": "jsonl", "path": "meta.jsonl", "balance_by": "tag"}, base_dir=tmp_path)


def test_balanced_evaluation_gives_each_metadata_value_an_equal_share(tmp_path):
    records = [{"prompt": f"a thing {i}", "tag": "many"} for i in range(9)] + [{"prompt": "a rare thing", "tag": "rare"}]
    held = [{"prompt": f"an unseen thing {i}", "tag": "many"} for i in range(3)] + [{"prompt": "an odd one", "tag": "rare"}]
    write(tmp_path, "meta.jsonl", jsonl(records))
    write(tmp_path, "held.jsonl", jsonl(held))
    options = {"kind": "jsonl", "path": "meta.jsonl", "held_out_path": "held.jsonl", "balance_by": "tag"}
    source = build_condition_source(options, base_dir=tmp_path)
    train = source.evaluation_conditions("train", 4)  # 40 samples: 20 per tag, 9 prompts share one half
    tags = [meta["tag"] for meta in train.metadata]
    assert tags.count("rare") == 20 and tags.count("many") == 9 * 3  # ceil(20 / 9) = 3 each
    assert train.prompts == tuple(p for p in source.train_keys for _ in range(20 if p == "a rare thing" else 3))
    held_out = source.evaluation_conditions("held_out", 2)  # 8 samples: 4 per tag
    assert held_out.prompts == tuple(p for p in source.held_out_keys for _ in range(4 if p == "an odd one" else 2))
    plain = build_condition_source({k: v for k, v in options.items() if k != "balance_by"}, base_dir=tmp_path)
    assert plain.evaluation_conditions("train", 4).prompts == tuple(p for p in plain.train_keys for _ in range(4))


def test_balance_by_a_key_a_held_out_prompt_lacks_is_a_recipe_error(tmp_path):
    write(tmp_path, "meta.jsonl", jsonl([{"prompt": "a thing", "tag": "x"}, {"prompt": "another", "tag": "y"}]))
    write(tmp_path, "held.jsonl", jsonl([{"prompt": "an unseen thing", "colour": "red"}]))
    options = {"kind": "jsonl", "path": "meta.jsonl", "held_out_path": "held.jsonl", "balance_by": "tag"}
    with pytest.raises(RecipeError, match="conditions.balance_by: .*'an unseen thing' has no metadata key 'tag'"):
        build_condition_source(options, base_dir=tmp_path)


@pytest.mark.parametrize("values", [
    [1, 1, 1, 1, 1, 2],                                  # a numeric key
    [["a", "b"], ["a", "b"], ["a", "b"], ["c"], ["c"], ["c"]],  # a list-valued key
    ["x", "x", "y", "y", "z", "z"],                       # already balanced: equal repeats, as without balance_by
])
def test_balanced_evaluation_of_other_keys_and_a_fraction_held_out(tmp_path, values):
    records = [{"prompt": f"thing {i}", "tag": v} for i, v in enumerate(values)]
    write(tmp_path, "meta.jsonl", jsonl(records))
    source = build_condition_source({"kind": "jsonl", "path": "meta.jsonl", "balance_by": "tag"}, base_dir=tmp_path)
    drawn = source.evaluation_conditions("train", 3)
    shares = {}
    for meta in drawn.metadata:
        shares[json.dumps(meta["tag"])] = shares.get(json.dumps(meta["tag"]), 0) + 1
    assert max(shares.values()) - min(shares.values()) <= len(values)  # equal up to rounding up per prompt
    assert all(drawn.prompts.count(p) >= 1 for p in source.train_keys)  # every prompt still evaluated
    if len(set(map(json.dumps, values))) == 3:
        assert drawn.prompts == tuple(p for p in source.train_keys for _ in range(3))
    held = build_condition_source({"kind": "jsonl", "path": "meta.jsonl", "balance_by": "tag", "held_out": 0.34},
                                  base_dir=tmp_path)  # a held-out fraction is balanced as a held-out file is
    held_tags = [json.dumps(m["tag"]) for m in held.evaluation_conditions("held_out", 4).metadata]
    counts = [held_tags.count(t) for t in set(held_tags)]
    assert max(counts) - min(counts) <= 2 * len(held.held_out_keys)


def test_sample_without_prompts_draws_every_training_prompt_once_even_when_balanced(tmp_path):
    from types import SimpleNamespace

    from rewardtune.sampling import requested_conditions

    records = [{"prompt": f"a thing {i}", "tag": "many"} for i in range(5)] + [{"prompt": "a rare thing", "tag": "rare"}]
    write(tmp_path, "meta.jsonl", jsonl(records))
    source = build_condition_source({"kind": "jsonl", "path": "meta.jsonl", "balance_by": "tag"}, base_dir=tmp_path)
    chosen = requested_conditions(SimpleNamespace(source=source), None, None, run="run")
    assert chosen.prompts == source.train_keys
