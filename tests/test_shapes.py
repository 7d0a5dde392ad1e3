"""The shapes benchmark: renderer, captions and metadata, prompt splits and files, the verifier and its reward, and
the shapes feature extractor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import rewardtune.nets.shapes as shapes_nets
from rewardtune.conditional_evaluation import (
    conditional_reward_metrics,
    reward_evaluation_metrics,
)
from rewardtune.conditions import Conditions
from rewardtune.data.shapes import (
    BORDER,
    CATEGORIES,
    GAP,
    METADATA_KEYS,
    RELATION_MARGIN,
    Scene,
    ShapeObject,
    all_prompts,
    all_scenes,
    build_shapes,
    degrade,
    layout,
    render,
    render_many,
    split_prompts,
    split_scenes,
)
from rewardtune.data.shapes_prompts import write_prompt_files
from rewardtune.errors import PluginError, RecipeError
from rewardtune.metrics.fid import build_feature_extractor, check_feature_extractor
from rewardtune.registry import DATA, REWARDS
from rewardtune.rewards.base import Reward
from rewardtune.rewards.composite import CompositeReward
from rewardtune.rewards.shapes import (
    ShapesReward,
    detect_objects,
    verifier_accuracy,
    verify,
)

REPO = Path(__file__).resolve().parents[1]
RED_CIRCLE, BLUE_SQUARE = ShapeObject("red", "circle"), ShapeObject("blue", "square")
LEFT_OF = Scene("position", (RED_CIRCLE, BLUE_SQUARE), "left_of")


def renders(scene: Scene, n: int, size: int = 16, *, noisy: bool = False, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = render_many([scene] * n, size, generator)
    return degrade(images, generator) if noisy else images


# ---- renderer -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [16, 32])
def test_render_is_deterministic_and_in_range(size: int):
    first = render(LEFT_OF, size, torch.Generator().manual_seed(3))
    assert first.shape == (3, size, size) and first.dtype == torch.float32
    assert float(first.min()) == -1.0 and float(first.max()) == 1.0  # black background, saturated colours
    torch.testing.assert_close(render(LEFT_OF, size, 3), first, rtol=0, atol=0)  # a seed is a fresh generator
    assert not torch.equal(render(LEFT_OF, size, 4), first)
    generator = torch.Generator().manual_seed(3)
    single = Scene("single", (RED_CIRCLE,))
    together = render_many([LEFT_OF, single], size, torch.Generator().manual_seed(3))
    one_by_one = torch.stack([render(LEFT_OF, size, generator), render(single, size, generator)])
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=0)


@pytest.mark.parametrize("size", [16, 32])
def test_layouts_keep_objects_inside_apart_and_the_relation_true(size: int):
    generator = torch.Generator().manual_seed(0)
    scenes = all_scenes(["count", "position"])
    for scene in scenes[::7]:
        places = layout(scene, size, generator)
        assert len(places) == len(scene.instances())
        for p in places:  # inside the image by the border
            assert BORDER * size - 1e-9 <= p.x - p.side / 2 and p.x + p.side / 2 <= size - BORDER * size + 1e-9
            assert BORDER * size - 1e-9 <= p.y - p.side / 2 and p.y + p.side / 2 <= size - BORDER * size + 1e-9
        a, b = places
        half = (a.side + b.side) / 2
        assert max(abs(b.x - a.x) - half, abs(b.y - a.y) - half) >= GAP * size - 1e-9  # boxes apart
        if scene.relation is not None:
            dx, dy = b.x - a.x, b.y - a.y
            along = {"left_of": dx, "right_of": -dx, "above": dy, "below": -dy}[scene.relation]
            across = abs(b.y - a.y) if scene.relation in ("left_of", "right_of") else abs(b.x - a.x)
            assert along >= across + RELATION_MARGIN * size - 1e-9


def test_small_sizes_are_refused():
    with pytest.raises(ValueError, match="size >= 16"):
        render(LEFT_OF, 8, 0)


# ---- captions, metadata, splits -------------------------------------------------------------------------------------
def test_captions_and_metadata_agree():
    assert Scene("single", (RED_CIRCLE,)).caption() == "a red circle"
    assert Scene("count", (ShapeObject("yellow", "circle"),)).caption() == "two yellow circles"
    assert Scene("two_objects", (RED_CIRCLE, BLUE_SQUARE)).caption() == "a red circle and a blue square"
    triangle = ShapeObject("green", "triangle")
    left = Scene("position", (BLUE_SQUARE, triangle), "left_of")
    assert left.caption() == "a blue square to the left of a green triangle"
    assert Scene("position", (BLUE_SQUARE, triangle), "below").caption() == "a blue square below a green triangle"
    assert LEFT_OF.metadata() == {
        "category": "position", "objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}],
        "count": 1, "relation": "left_of",
    }
    prompts = all_prompts()
    assert [len(all_scenes([c])) for c in CATEGORIES] == [12, 12, 66, 528]
    assert len({caption for caption, _ in prompts}) == len(prompts)  # one caption per scene
    for (caption, metadata), scene in zip(prompts, all_scenes()):
        assert set(metadata) == METADATA_KEYS
        assert json.loads(json.dumps(metadata)) == metadata
        assert Scene.from_metadata(metadata) == scene and scene.caption() == caption


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({**LEFT_OF.metadata(), "tag": "position"}, "unknown \\['tag'\\]"),
        ({k: v for k, v in LEFT_OF.metadata().items() if k != "relation"}, "missing \\['relation'\\]"),
        ({**LEFT_OF.metadata(), "count": 2}, "'count' must be 1"),
        ({**LEFT_OF.metadata(), "relation": "near"}, "unknown relation 'near'"),
        ({**LEFT_OF.metadata(), "objects": [{"color": "pink", "shape": "circle"}] * 2}, "unknown colour 'pink'"),
        ({**LEFT_OF.metadata(), "category": "two_objects"}, "relation must be set exactly for 'position'"),
    ],
)
def test_metadata_off_the_schema_is_refused(metadata: dict, message: str):
    with pytest.raises(ValueError, match=message):
        Scene.from_metadata(metadata)


def test_split_is_disjoint_covers_every_category_and_is_deterministic():
    train, held_out = split_scenes(0.25, seed=0)
    assert sorted(map(str, train + held_out)) == sorted(map(str, all_scenes()))
    assert not {s.canonical() for s in train} & {s.canonical() for s in held_out}  # not even said another way
    for category in CATEGORIES:
        assert any(s.category == category for s in held_out) and any(s.category == category for s in train)
    assert split_prompts(0.25, 0) == split_prompts(0.25, 0)
    assert split_prompts(0.25, 1)[1] != split_prompts(0.25, 0)[1]
    with pytest.raises(ValueError, match="held_out_fraction"):
        split_prompts(1.0, 0)


def test_prompt_files_match_the_split_and_the_repository(tmp_path: Path):
    written = write_prompt_files(tmp_path, 0.25, 0)
    assert sorted(written) == ["held_out.jsonl", "held_out.txt", "train.jsonl", "train.txt"]
    train, held_out = split_prompts(0.25, 0)
    assert written["train.txt"].read_text().splitlines() == [caption for caption, _ in train]
    records = [json.loads(line) for line in written["held_out.jsonl"].read_text().splitlines()]
    assert [(r.pop("prompt"), r) for r in records] == held_out
    for name, path in written.items():  # scripts/make_shapes_prompts.py wrote the same files into the repository
        assert (REPO / "recipes" / "prompts" / "shapes" / name).read_text() == path.read_text()


# ---- the data source ------------------------------------------------------------------------------------------------
def test_data_source_renders_its_split_and_samples_rows_with_their_conditions():
    data = DATA.get("shapes")(size=16, num_images=120, seed=0, split="held_out")
    held_out = {caption for caption, _ in split_prompts(0.25, 0)[1]}
    assert data.images.shape == (120, 3, 16, 16) and data.sample_shape == (3, 16, 16)
    assert set(data.captions) <= held_out and len(data.captions) == len(data.metadata) == 120
    assert bool(verify(data.images, data.metadata)[0].all())  # every render shows its caption
    torch.testing.assert_close(build_shapes(num_images=120, split="held_out").images, data.images, rtol=0, atol=0)
    images = data.sample(6, torch.Generator().manual_seed(1))
    same, conditions = data.sample_conditioned(6, torch.Generator().manual_seed(1))
    torch.testing.assert_close(same, images, rtol=0, atol=0)
    assert isinstance(conditions, Conditions) and len(conditions) == 6
    for image, caption, metadata in zip(same, conditions.prompts, conditions.metadata):
        row = next(i for i in range(len(data)) if torch.equal(data.images[i], image))
        assert (data.captions[row], data.metadata[row]) == (caption, metadata)



@pytest.mark.parametrize("num_images", [400, 403])
def test_category_balance_gives_each_category_an_equal_share(num_images: int):
    from collections import Counter

    by_prompt = build_shapes(num_images=num_images, split="train")
    balanced = build_shapes(num_images=num_images, split="train", balance="category")
    per_category = Counter(m["category"] for m in balanced.metadata)
    assert sorted(per_category.values()) == sorted([num_images // 4 + (i < num_images % 4) for i in range(4)])
    assert Counter(m["category"] for m in by_prompt.metadata)["position"] > 0.8 * num_images  # 396 of 464 prompts
    singles = Counter(c for c, m in zip(balanced.captions, balanced.metadata) if m["category"] == "single")
    assert len(singles) == 9 and max(singles.values()) - min(singles.values()) <= 1  # each prompt equally often
    assert bool(verify(balanced.images, balanced.metadata)[0].all())
    with pytest.raises(ValueError, match="balance must be"):
        build_shapes(num_images=10, balance="prompts")

# ---- the verifier ---------------------------------------------------------------------------------------------------
def test_verifier_accuracy_and_false_passes():
    """The thresholds of docs/shapes.md, on 300 renders per category at 16x16 and 100 at 32x32 (verification takes
    about 0.4 ms an image)."""
    results = verifier_accuracy(16, 300, seed=0)
    for category in CATEGORIES:
        for prefix in ("", "noisy_"):
            assert results[f"{prefix}accuracy/{category}"] >= 0.98
            assert results[f"{prefix}false_pass/{category}"] <= 0.05
            assert results[f"{prefix}near_miss_false_pass/{category}"] <= 0.05
    results = verifier_accuracy(32, 100, seed=1)
    assert results["accuracy"] >= 0.98 and results["noisy_accuracy"] >= 0.98
    assert results["near_miss_false_pass"] <= 0.05 and results["noisy_near_miss_false_pass"] <= 0.05


@pytest.mark.parametrize("noisy", [False, True], ids=["clean", "noisy"])
@pytest.mark.parametrize(
    "asked, failing",
    [
        (Scene("position", (ShapeObject("green", "circle"), BLUE_SQUARE), "left_of"), "color"),
        (Scene("position", (ShapeObject("red", "triangle"), BLUE_SQUARE), "left_of"), "shape"),
        (Scene("position", (RED_CIRCLE, BLUE_SQUARE), "right_of"), "relation"),
        (Scene("position", (BLUE_SQUARE, RED_CIRCLE), "left_of"), "relation"),
        (Scene("position", (RED_CIRCLE, BLUE_SQUARE), "above"), "relation"),
        (Scene("single", (RED_CIRCLE,)), "count"),  # the blue square is an extra object
        (Scene("count", (RED_CIRCLE,)), "shape"),  # two objects, but the second is no red circle
    ],
    ids=["colour", "shape", "swapped", "swapped_objects", "other_axis", "extra_object", "two_of_one"],
)
def test_wrong_captions_fail_the_right_check(asked: Scene, failing: str, noisy: bool):
    images = renders(LEFT_OF, 20, noisy=noisy)
    passed, details = verify(images, [asked.metadata()] * 20)
    assert not bool(passed.any())
    assert not bool(details[failing].any())
    assert bool(verify(images, [LEFT_OF.metadata()] * 20)[0].all())  # the right caption passes


def test_missing_and_extra_objects_fail_the_count():
    two = renders(Scene("count", (RED_CIRCLE,)), 10, noisy=True)
    one = renders(Scene("single", (RED_CIRCLE,)), 10, noisy=True)
    assert not bool(verify(one, [Scene("count", (RED_CIRCLE,)).metadata()] * 10)[1]["count"].any())
    assert not bool(verify(two, [Scene("single", (RED_CIRCLE,)).metadata()] * 10)[1]["count"].any())
    blank = -torch.ones(2, 3, 16, 16)
    assert not bool(verify(blank, [Scene("single", (RED_CIRCLE,)).metadata()] * 2)[0].any())


def test_an_object_of_no_palette_colour_is_an_extra_object():
    image = render(Scene("single", (RED_CIRCLE,)), 16, 0)
    detections = detect_objects(image)
    assert [(d.color, d.shape) for d in detections] == [("red", "circle")]
    x = int(detections[0].x)
    column = slice(0, 4) if x >= 8 else slice(12, 16)  # a white square away from the circle
    image[:, 6:10, column] = 1.0
    assert sorted(d.color for d in detect_objects(image)) == ["other", "red"]
    passed, details = verify(image[None], [Scene("single", (RED_CIRCLE,)).metadata()])
    assert not bool(passed[0]) and not bool(details["count"][0]) and not bool(details["color"][0])


# ---- the reward -----------------------------------------------------------------------------------------------------
def test_reward_scores_pass_fail_and_partial_checks():
    reward = REWARDS.get("shapes")()
    assert isinstance(reward, ShapesReward) and not reward.differentiable and not reward.learns
    images = renders(LEFT_OF, 4)
    asked = [LEFT_OF, LEFT_OF, Scene("position", (RED_CIRCLE, BLUE_SQUARE), "right_of"), Scene("count", (RED_CIRCLE,))]
    conditions = Conditions.from_prompts([s.caption() for s in asked], [s.metadata() for s in asked])
    scores = reward(images, conditions)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert scores.tolist() == [1.0, 1.0, 0.0, 0.0]
    partial = REWARDS.get("shapes")(partial=True)(images, conditions)
    # right_of: colour, shape, count pass, relation fails (3/4); "two red circles": count passes, colour and shape
    # fail (1/3)
    torch.testing.assert_close(partial, torch.tensor([1.0, 1.0, 0.75, 1 / 3]), rtol=0, atol=1e-6)


def test_reward_without_metadata_is_a_plugin_error():
    reward = ShapesReward()
    images = renders(LEFT_OF, 2)
    message = "reward 'shapes' needs each sample's prompt metadata; add a \\[conditions\\] prompt source"
    with pytest.raises(PluginError, match=message):
        reward(images)
    with pytest.raises(PluginError, match=message):
        reward(images, Conditions.from_prompts(["a", "b"]))  # prompts without metadata
    with pytest.raises(PluginError, match=message):
        reward(images, Conditions.from_labels([0, 1]))


def test_reward_evaluation_metrics_per_category():
    reward = ShapesReward()
    scenes = [s for category in CATEGORIES for s in all_scenes([category])[:2]]  # two prompts of each category
    images = render_many(scenes, 16, torch.Generator().manual_seed(0))
    conditions = Conditions.from_prompts([s.caption() for s in scenes], [s.metadata() for s in scenes])
    metrics = reward.evaluation_metrics(images, conditions)
    assert set(metrics) == {"accuracy", *(f"accuracy/{c}" for c in CATEGORIES)}
    assert all(value == 1.0 for value in metrics.values())
    yellow_triangle = Scene("single", (ShapeObject("yellow", "triangle"),))  # in none of the images
    wrong = Conditions.from_prompts(conditions.prompts, [yellow_triangle.metadata()] * len(scenes))
    assert reward.evaluation_metrics(images, wrong) == {"accuracy": 0.0, "accuracy/single": 0.0}
    assert reward.evaluation_metrics(images) == {}


class LearnedZero(Reward):
    """A learning reward with no metrics of its own (a stand-in for a learned energy)."""

    learns = True

    def forward(self, x, context=None):
        return x.new_zeros(x.shape[0])


def test_a_composite_reports_its_verifier_beside_a_learned_energy():
    """reward = verifier + learned term: evaluation reports the verifier's accuracies (every term's own metrics, in the
    term's image range, with the conditions), and no reward_mean, which would move with the learned term."""
    scenes = [s for category in CATEGORIES for s in all_scenes([category])[:2]]
    images = render_many(scenes, 16, torch.Generator().manual_seed(0)) * 2 - 1  # samples come in [-1, 1]
    conditions = Conditions.from_prompts([s.caption() for s in scenes], [s.metadata() for s in scenes])
    verifier = ShapesReward()
    composite = CompositeReward({"shapes": (verifier, 1.0), "energy": (LearnedZero(), 1.0)})
    assert composite.learns and composite.reports_evaluation_metrics and not LearnedZero().reports_evaluation_metrics
    expected = reward_evaluation_metrics(verifier, images, conditions)
    assert expected["accuracy"] == 1.0 and composite.evaluation_metrics(images, conditions) == expected
    assert conditional_reward_metrics(composite, images, conditions) == expected  # no reward_mean
    assert set(conditional_reward_metrics(verifier, images, conditions)) == {"reward_mean", *expected}
    twice = CompositeReward({"a": (verifier, 1.0), "b": (ShapesReward(partial=True), 1.0)})
    assert set(twice.evaluation_metrics(images, conditions)) == {*expected, *(f"b/{k}" for k in expected)}


# ---- the feature extractor ------------------------------------------------------------------------------------------
def test_feature_extractor_is_cached_and_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("REWARDTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(shapes_nets, "STEPS", 20)  # a token training run: the test is about caching and shapes
    monkeypatch.setattr(shapes_nets, "POOL_SIZE", 200)
    assert check_feature_extractor("shapes", (3, 16, 16)) is None
    for shape in [(1, 8, 8), (3, 8, 8), (3, 16, 32)]:
        with pytest.raises(RecipeError, match="'shapes' takes RGB shapes images"):
            check_feature_extractor("shapes", shape)
    images = renders(LEFT_OF, 5)
    extractor = build_feature_extractor("shapes")
    features = extractor(images)
    assert features.shape == (5, shapes_nets.FEATURES) and features.dtype == torch.float32
    torch.testing.assert_close(extractor(images), features, rtol=0, atol=0)
    cached = tmp_path / f"shapes_classifier_v{shapes_nets.VERSION}_16.safetensors"
    assert cached.exists() and not list(tmp_path.glob(".*.tmp"))
    monkeypatch.setattr(shapes_nets, "train_shapes_classifier", None)  # a second extractor must load, not train
    torch.testing.assert_close(build_feature_extractor("shapes")(images), features, rtol=0, atol=0)
    with pytest.raises(ValueError, match="square images"):
        extractor(torch.zeros(2, 1, 16, 16))
