"""Conditional generation (issue W2 3/8): the condition reaches policy, value, reward and evaluator; conditional
log-probs are Gaussian; classifier-free guidance; DDPM pretraining with p_uncond; unconditional runs unchanged."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import recording_rewards
import torch
from test_cli import cli

from rewardtune.algorithms.ddpm import build_ddpm
from rewardtune.api import build_trainer, make_recipe
from rewardtune.backbones.mlp import build_mlp_backbone
from rewardtune.conditions import NULL_LABEL, Conditions
from rewardtune.errors import RecipeError
from rewardtune.nets.conditioning import Conditioning, classifier_free_guidance
from rewardtune.nets.value import build_time_mlp_value

FIXTURES = Path(__file__).parent / "fixtures"
LABELS = Conditioning(num_classes=8)


def conditional_mlp(cfg_scale: float = 1.0, num_steps: int = 3):
    torch.manual_seed(0)
    return build_mlp_backbone((2,), LABELS, num_steps=num_steps, hidden=32, depth=2, time_dim=16, cfg_scale=cfg_scale)


# ---- the Conditions batch ------------------------------------------------------------------------------------------
def test_conditions_select_repeat_cat_and_dropped():
    c = Conditions(labels=torch.tensor([3, 1, 4]), prompts=("a", "b", "c"), metadata=({"k": 0}, {"k": 1}, {"k": 2}))
    picked = c.select(torch.tensor([2, 0]))
    assert picked.labels.tolist() == [4, 3] and picked.prompts == ("c", "a") and picked.metadata[1] == {"k": 0}
    assert c.repeat(2).labels.tolist() == [3, 1, 4, 3, 1, 4] and len(c.repeat(2)) == 6
    dropped = c.dropped(torch.tensor([False, True, False]))
    assert dropped.labels.tolist() == [3, NULL_LABEL, 4] and dropped.prompts == c.prompts  # rewards still see prompts
    text = Conditions(prompts=("a", "b"), embeddings=torch.ones(2, 4)).null()
    assert bool((text.embeddings == 0).all())
    assert c.keys() == ["a", "b", "c"] and Conditions.from_labels([2]).keys() == ["class 2"]


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"labels": torch.tensor([1.0])}, {"labels": torch.tensor([1, 2]), "prompts": ("a",)},
     {"prompts": ("a",), "embeddings": torch.zeros(1, 2, 3)}],
)
def test_conditions_refuse_malformed_batches(kwargs):
    with pytest.raises(ValueError):
        Conditions(**kwargs)


# ---- the conditional policy --------------------------------------------------------------------------------------
def test_conditional_log_prob_matches_torch_distributions():
    policy = conditional_mlp()
    x = torch.randn(6, 2)
    t = torch.tensor([0, 1, 2, 0, 1, 2])
    c = Conditions.from_labels([0, 1, 2, 3, 4, 7])
    x_next = torch.randn(6, 2)
    mean = policy.mean_at(x, t, c)
    sigma = policy.sigma()[t].view(-1, 1)
    expected = torch.distributions.Normal(mean, sigma).log_prob(x_next).sum(1)
    torch.testing.assert_close(policy.log_prob(x_next, x, t, c), expected, rtol=1e-5, atol=1e-5)
    # the condition is used: another label moves the mean
    assert not torch.allclose(mean, policy.mean_at(x, t, Conditions.from_labels([1, 2, 3, 4, 5, 0])))


def test_sampled_log_probs_are_those_of_the_conditional_transitions():
    policy = conditional_mlp()
    c = Conditions.from_labels(torch.arange(8))
    trajectory = policy.sample(8, torch.Generator().manual_seed(1), condition=c)
    assert trajectory.condition is not None and trajectory.condition.labels.tolist() == list(range(8))
    for t in range(policy.num_steps):
        tt = torch.full((8,), t)
        recomputed = policy.log_prob(trajectory.states[t + 1], trajectory.states[t], tt, c)
        # float32: (x_{t+1} - mean)^2 / sigma_t^2 loses about 1e-3 relative at the smallest sigma_t
        torch.testing.assert_close(recomputed, trajectory.log_probs[t], rtol=3e-3, atol=1e-3)


def test_cfg_scale_one_is_the_conditional_model_and_others_extrapolate():
    x, t = torch.randn(4, 2), torch.tensor([0, 1, 2, 1])
    c = Conditions.from_labels([0, 5, 2, 7])
    plain, guided = conditional_mlp(1.0), conditional_mlp(3.0)
    torch.testing.assert_close(conditional_mlp(1.0).mean_at(x, t, c), plain.mean_at(x, t, c), rtol=0, atol=0)
    k, ab = plain.timesteps[t], plain.step_alphas_cumprod[t]
    eps_c = plain.predict_eps(x, k, ab, c)
    eps_u = plain.predict_eps(x, k, ab, c.null())
    torch.testing.assert_close(guided.predict_eps(x, k, ab, c), eps_u + 3.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(classifier_free_guidance(eps_c, eps_u, 0.0), eps_u)
    # the guided eps is the policy mean's: a_t x + c_t eps_guided
    a, cc = guided.coef_a[t].view(-1, 1), guided.coef_c[t].view(-1, 1)
    torch.testing.assert_close(guided.mean_at(x, t, c), a * x + cc * (eps_u + 3.0 * (eps_c - eps_u)), rtol=1e-5, atol=1e-5)


def test_cfg_needs_a_conditional_backbone():
    with pytest.raises(ValueError, match="cfg_scale"):
        build_mlp_backbone((2,), num_steps=3, cfg_scale=2.0)


def test_an_unconditional_policy_refuses_conditions():
    policy = build_mlp_backbone((2,), num_steps=3)
    with pytest.raises(ValueError, match="unconditional"):
        policy.sample(2, condition=Conditions.from_labels([0, 1]))


def test_ddpm_pretraining_drops_conditions_with_p_uncond():
    policy = conditional_mlp()
    seen = []
    original = policy.eps_net.forward

    def spy(x, k, c=None):
        seen.append(None if c is None else c.clone())
        return original(x, k, c)

    policy.eps_net.forward = spy
    algorithm = build_ddpm(policy, p_uncond=0.5)
    real = torch.randn(4000, 2)
    labels = Conditions.from_labels(torch.randint(0, 8, (4000,), generator=torch.Generator().manual_seed(0)))
    metrics = algorithm.update(real, None, torch.Generator().manual_seed(1), real_condition=labels)
    assert torch.isfinite(torch.tensor(metrics["ddpm/loss"]))
    used = seen[-1]
    dropped = used == NULL_LABEL
    assert 0.45 < float(dropped.float().mean()) < 0.55  # about half trained without their class
    assert torch.equal(used[~dropped], labels.labels[~dropped])  # the rest with their own
    with pytest.raises(ValueError, match="unconditional"):
        build_ddpm(build_mlp_backbone((2,), num_steps=3), p_uncond=0.1)


def test_conditional_value_uses_the_condition():
    value = build_time_mlp_value((2,), LABELS, hidden=16, depth=2, time_dim=16)
    x, t = torch.randn(3, 2), torch.tensor([0, 1, 2])
    a, b = value(x, t, Conditions.from_labels([0, 1, 2])), value(x, t, Conditions.from_labels([3, 4, 5]))
    assert a.shape == (3,) and not torch.allclose(a, b)


# ---- end to end: the condition reaches policy, value, reward and evaluator ----------------------------------------
def conditional_tables(reward: str = "recording_rewards:build_recording_reward", algorithm: str = "dxdp") -> dict:
    return {
        "data": {"kind": "8gaussians"},
        "conditions": {"kind": "labels", "num_classes": 8},
        "backbone": {"kind": "mlp", "num_steps": 3, "hidden": 32, "depth": 2, "time_dim": 16},
        "value": {"kind": "time_mlp", "hidden": 32, "depth": 2, "time_dim": 16},
        "reward": {"kind": reward},
        "algorithm": {"kind": algorithm, "sampler_lr": 1e-3},
        "train": {"steps": 3, "batch_size": 16, "log_every": 1, "checkpoint_every": 10},
        "eval": {"num_samples": 64, "repeats": 1, "plot": False},
    }


@pytest.mark.parametrize("algorithm", ["dxdp", "policy_gradient"])
def test_the_condition_reaches_policy_value_reward_and_evaluator(algorithm):
    trainer = build_trainer(make_recipe(conditional_tables(algorithm=algorithm)))
    value_conditions = []
    original_value = trainer.algorithm.value.forward

    def spy_value(x, t, condition=None):
        value_conditions.append(condition)
        return original_value(x, t, condition)

    trainer.algorithm.value.forward = spy_value
    recording_rewards.CALLS.clear()
    sampled = []
    original_sample = trainer.backbone.sample

    def spy_sample(n, generator=None, guide=None, x0=None, condition=None):
        trajectory = original_sample(n, generator, guide, x0, condition)
        sampled.append(trajectory.condition)
        return trajectory

    trainer.backbone.sample = spy_sample
    trainer.train_step()
    # the rollout was drawn under conditions, and the reward and value saw those same conditions
    (rollout,) = sampled
    assert rollout is not None and len(rollout) == 16
    assert any(call["labels"] is not None and torch.equal(call["labels"], rollout.labels.cpu())
               for call in recording_rewards.CALLS)
    assert value_conditions and all(c is not None for c in value_conditions)
    assert any(  # the TD regression's rows are the chains' time slices, conditioned as the chains are
        torch.equal(c.labels.cpu(), rollout.repeat(len(c) // 16).labels.cpu()) for c in value_conditions if len(c) % 16 == 0
    )
    # the evaluator samples every class equally and scores each sample under its own class
    recording_rewards.CALLS.clear()
    metrics = trainer.evaluate()
    assert {"class_accuracy", "class_accuracy/class 0", "reward_mean"} <= set(metrics)
    labels = recording_rewards.CALLS[-1]["labels"]
    assert labels is not None and torch.equal(torch.bincount(labels, minlength=8), torch.full((8,), 8))


def test_a_reward_that_takes_no_context_works_in_a_conditional_run():
    trainer = build_trainer(make_recipe(conditional_tables(reward="recording_rewards:build_context_free_reward")))
    metrics = trainer.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert "reward_mean" in trainer.evaluate()


def test_class_accuracy_measures_the_conditioned_class():
    """A sampler that ignores its condition (zero-initialised condition weights, trained on nothing) scores about
    1/8 on 8 Gaussians; one that puts each class on its own centre scores 1."""
    trainer = build_trainer(make_recipe(conditional_tables()))
    data = trainer.data
    labels = torch.arange(8).repeat(10)
    assert float((data.classify(data.centers[labels].float()) == labels).float().mean()) == 1.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"algorithm": {"kind": "recording_rewards:build_unconditional_algorithm"}}, "does not train conditional"),
        ({"value": {"kind": "recording_rewards:build_plain_value"}}, "does not take a condition"),
        ({"conditions": {"kind": "labels", "num_classes": 8, "text_encoder": {"kind": "hash"}}}, "text_encoder"),
    ],
)
def test_a_recipe_part_that_would_ignore_the_condition_is_refused(change, message):
    tables = conditional_tables()
    tables.update(change)
    with pytest.raises(RecipeError, match=message):
        build_trainer(make_recipe(tables))


def composite_with_energy(energy: dict) -> dict:
    return {"kind": "composite", "terms": [
        {"kind": "recording_rewards:build_recording_reward", "name": "recording"}, {**energy, "weight": 0.5}]}


def test_a_conditional_energy_in_a_composite_learns_each_side_under_its_own_conditions():
    """A learned energy E(x, c) beside an external reward: the composite hands the energy's update the data's
    conditions and the samples', and its forward the samples' conditions, as it does to every term."""
    tables = conditional_tables()
    tables["reward"] = composite_with_energy({"kind": "energy", "share_with_value": False, "hidden": 16, "depth": 2})
    trainer = build_trainer(make_recipe(tables))
    energy = trainer.reward.terms["energy"]
    assert trainer.reward.learns and energy.energy.value.conditioning is not None
    updates = []
    original_update = energy.update

    def spy_update(real, fake, real_condition=None, fake_condition=None):
        updates.append((real, real_condition, fake_condition))
        return original_update(real, fake, real_condition, fake_condition)

    energy.update = spy_update
    recording_rewards.CALLS.clear()
    before = [p.detach().clone() for p in energy.parameters()]
    metrics = trainer.train_step()
    ((real, real_condition, fake_condition),) = updates
    # the data's own labels (the Gaussian each point was drawn from) and the rollout's labels
    assert torch.equal(trainer.data.classify(real).cpu(), real_condition.labels.cpu())
    rollout_labels = [c["labels"] for c in recording_rewards.CALLS if c["labels"] is not None]
    assert rollout_labels and torch.equal(fake_condition.labels.cpu(), rollout_labels[0])
    assert {"energy/loss", "reward/recording", "reward/energy"} <= set(metrics)
    assert any(not torch.equal(a, b) for a, b in zip(before, energy.parameters()))  # it trained
    # the energy depends on the condition it is given
    x = torch.randn(4, 2)
    assert not torch.allclose(energy(x, Conditions.from_labels([0, 1, 2, 3])), energy(x, Conditions.from_labels([4] * 4)))


def test_a_learning_term_that_would_ignore_the_condition_is_refused():
    tables = conditional_tables()
    tables["reward"] = composite_with_energy({"kind": "recording_rewards:build_plain_energy"})
    with pytest.raises(RecipeError, match="term 'build_plain_energy'.*must take the condition"):
        build_trainer(make_recipe(tables))


# ---- unconditional runs are what they were ----------------------------------------------------------------------
# Final metrics of recipes/tiny_8gaussians.toml (seed 0) measured with the code before conditions existed (commit
# 16f5bea): the same runs must give the same numbers.
BEFORE_CONDITIONS = {
    "dxdp": {"sliced_wasserstein": 152.062721, "sliced_wasserstein_std": 0.747535, "energy_auc": 0.498028},
    "policy_gradient": {"sliced_wasserstein": 159.629394, "sliced_wasserstein_std": 0.48479, "energy_auc": 0.484936},
}


@pytest.mark.parametrize("algorithm", sorted(BEFORE_CONDITIONS))
def test_unconditional_runs_give_the_numbers_they_gave_before_conditions(algorithm, tmp_path, capsys):
    recipe = Path(__file__).parent.parent / "recipes" / "tiny_8gaussians.toml"
    out = tmp_path / algorithm
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(out), "--set", f"algorithm.kind={algorithm}")
    assert code == 0, err
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    for name, before in BEFORE_CONDITIONS[algorithm].items():
        assert metrics[name] == pytest.approx(before, rel=1e-4), name


def test_a_run_directory_written_before_conditions_loads_evaluates_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "pre_conditions_tiny_8gaussians", run)
    before = json.loads((run / "eval.json").read_text())["metrics"]
    code, _, err = cli(capsys, "eval", str(run))
    assert code == 0, err
    again = json.loads((run / "eval.json").read_text())["metrics"]
    for name, value in before.items():
        assert again[name] == pytest.approx(value, rel=1e-4), name
    recipe = run / "recipe.toml"
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(run), "--resume", "--force", "--set", "train.steps=25")
    assert code == 0, err
    assert json.loads((run / "eval.json").read_text())["step"] == 25


# ---- group-relative and per-condition advantages -------------------------------------------------------------------
def test_group_advantages_standardise_within_each_group():
    from rewardtune.algorithms.advantages import group_advantages

    returns = torch.tensor([[1.0, 3.0, 10.0, 30.0], [0.0, 2.0, 5.0, 5.0]])  # T = 2, groups {0, 1}, {2, 3}
    adv = group_advantages(returns, 2)
    torch.testing.assert_close(adv[0], torch.tensor([-1.0, 1.0, -1.0, 1.0]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adv[1], torch.tensor([-1.0, 1.0, 0.0, 0.0]), rtol=1e-5, atol=1e-5)  # equal: zero
    with pytest.raises(ValueError):
        group_advantages(returns, 3)


def test_per_condition_stats_use_the_batch_until_min_count_then_their_own_buffer():
    from rewardtune.algorithms.advantages import PerConditionStats

    stats = PerConditionStats(buffer_size=4, min_count=2)
    first = stats.normalize(["a", "b"], torch.tensor([[1.0, 3.0]]))  # one return each: batch statistics
    torch.testing.assert_close(first, torch.tensor([[-1.0, 1.0]]), rtol=1e-5, atol=1e-5)
    second = stats.normalize(["a", "b"], torch.tensor([[3.0, 3.0]]))  # "a": {1, 3}, "b": {3, 3}
    torch.testing.assert_close(second, torch.tensor([[1.0, 0.0]]), rtol=1e-5, atol=1e-5)
    restored = PerConditionStats(buffer_size=4, min_count=2)
    restored.load_state_dict(stats.state_dict())
    assert {k: len(v) for k, v in restored.buffers.items()} == {"a": 2, "b": 2}


def prompt_tables(**algorithm) -> dict:
    tables = conditional_tables(reward="recording_rewards:build_context_free_reward", algorithm="policy_gradient")
    tables["conditions"] = {"kind": "prompts", "prompts": ["left", "right", "up", "down"],
                            "text_encoder": {"kind": "hash", "dim": 8}}
    del tables["value"]
    tables["algorithm"].update(algorithm)
    return tables


def test_grpo_rollouts_come_in_groups_per_prompt():
    trainer = build_trainer(make_recipe(prompt_tables(advantage="group", group_size=4)))
    sampled = []
    original = trainer.backbone.sample
    trainer.backbone.sample = lambda n, g=None, guide=None, x0=None, condition=None: sampled.append(condition) or original(
        n, g, guide, x0, condition)
    metrics = trainer.train_step()
    prompts = sampled[0].prompts
    assert len(prompts) == 16 and all(len(set(prompts[i:i + 4])) == 1 for i in range(0, 16, 4))
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


@pytest.mark.parametrize(
    ("algorithm", "message"),
    [({"advantage": "group", "group_size": 3}, "multiple of algorithm.group_size"),
     ({"advantage": "group"}, "group_size >= 2"),
     ({"group_size": 4}, "applies to advantage = 'group'")],
)
def test_bad_group_settings_are_refused(algorithm, message):
    with pytest.raises(RecipeError, match=message):
        build_trainer(make_recipe(prompt_tables(**algorithm)))


def test_per_condition_advantages_train():
    trainer = build_trainer(make_recipe(prompt_tables(advantage="per_condition", stat_min_count=2, stat_buffer_size=8)))
    for _ in range(2):
        metrics = trainer.train_step()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert set(trainer.algorithm.stats.buffers) == {"left", "right", "up", "down"}


def test_within_condition_diversity_is_the_mean_pairwise_distance_per_condition():
    from rewardtune.conditional_evaluation import within_condition_diversity

    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0]])
    # condition a: one pair at distance 5; condition b: two identical samples (a collapsed prompt) at distance 0
    assert within_condition_diversity(features, ["a", "a", "b", "b"]) == pytest.approx(2.5)
    assert math.isnan(within_condition_diversity(features[:2], ["a", "b"]))  # no condition has two samples


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("prompts.txt", "a red circle\n\na blue square\n", "line 2 is empty"),  # an empty line in a prompt file
        ("prompts.jsonl", '{"prompt": "a red circle", "colour": "red"}\n', "metadata key 'colour'"),  # not read
        ("prompts.jsonl", '{"prompt": "a red circle", "category": "single"\n', "line 1"),  # malformed JSON
    ],
)
def test_a_bad_prompt_file_is_a_one_line_error(name, text, message, tmp_path, capsys):
    """Exit code 2 and one line naming the problem, before anything runs (the shapes reward reads the metadata)."""
    (tmp_path / name).write_text(text)
    kind = "jsonl" if name.endswith(".jsonl") else "prompt_file"
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'[data]\nkind = "8gaussians"\n[conditions]\nkind = "{kind}"\npath = "{name}"\n'
        'text_encoder = { kind = "hash" }\n[backbone]\nkind = "mlp"\nnum_steps = 2\n[reward]\nkind = "shapes"\n'
        '[algorithm]\nkind = "ddpm"\n[train]\nsteps = 1\n'
    )
    code, _, err = cli(capsys, "run", str(recipe), "--out", str(tmp_path / "out"))
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_image_folder_labels_come_from_class_subfolders(tmp_path):
    from PIL import Image

    from rewardtune.data.images import build_image_folder
    from rewardtune.errors import RewardtuneError

    for name, folder in (("a.png", "cat"), ("b.png", "dog"), ("c.png", "cat")):
        (tmp_path / folder).mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / folder / name)
    data = build_image_folder(path=str(tmp_path), size=4, labels_from_folders=True)
    assert data.class_names == ("cat", "dog") and sorted(data.labels.tolist()) == [0, 0, 1]
    _, condition = data.sample_conditioned(8, torch.Generator().manual_seed(0))
    assert set(condition.labels.tolist()) <= {0, 1}
    Image.new("RGB", (4, 4)).save(tmp_path / "loose.png")
    with pytest.raises(RewardtuneError, match="not in a class subfolder"):
        build_image_folder(path=str(tmp_path), size=4, labels_from_folders=True)


def test_the_digits_classifier_scores_each_sample_for_its_own_class():
    plugin = pytest.importorskip("rewardtune_digits_classifier")
    from rewardtune.data.images import build_digits

    reward = plugin.build_digits_classifier_reward((1, 8, 8), Conditioning(num_classes=10))
    data = build_digits()
    x, labels = data.images[:20], data.labels[:20]
    log_probs = torch.log_softmax(reward.classifier(x), dim=1)
    torch.testing.assert_close(reward(x, Conditions(labels=labels)), log_probs[torch.arange(20), labels])
    assert reward.evaluation_metrics(x, Conditions(labels=labels))["target_class_fraction"] > 0.9  # real digits
    with pytest.raises(ValueError, match="target_class"):
        reward(x)  # no class condition and no target_class
    fixed = plugin.build_digits_classifier_reward((1, 8, 8), target_class=3)
    torch.testing.assert_close(fixed(x), log_probs[:, 3])


def test_a_conditional_energy_needs_data_with_conditions(tmp_path):
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    tables = {
        "data": {"kind": "image_folder", "path": str(tmp_path), "size": 8},  # no class labels
        "conditions": {"kind": "labels", "num_classes": 2},
        "backbone": {"kind": "ddpm", "pretrained": "", "num_steps": 2, "unet": {
            "sample_size": 8, "in_channels": 3, "out_channels": 3, "layers_per_block": 1, "block_out_channels": [8, 16],
            "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
            "norm_num_groups": 4}},
        "algorithm": {"kind": "ddpm"},
        "eval": {"feature_extractor": "helpers:tiny_features", "num_samples": 8},
    }
    with pytest.raises(RecipeError, match="has no class labels"):
        build_trainer(make_recipe(tables))
