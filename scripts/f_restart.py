"""f-Restart on the exact diffused-GMM harness (issue W2 6/8; the boosting thesis's Method B, Sec. 3.2).

    python scripts/f_restart.py [--seeds 0 1 2] [--iterations 40] [--divergence kl] [--plot docs/img/f_restart.png]

Target P: ten Gaussians on a circle (radius 2, std 0.15). The frozen model's score is the exact diffused score of the
same mixture with three modes at weight 0.01 (a score "trained on a subset of the modes"). The controller chooses,
at each of L = 12 steps, to denoise (one Heun step of a 6-step grid) or re-noise (back one level), as the thesis's
Algorithm 7; f-PG with f = KL (cost f'(p_psi / p_*) = d + 1, d the state discriminator's logit), PPO (clip 0.2, 4
epochs), 256 episodes per iteration. Printed per iteration: the re-noise fraction (the thesis's failure modes: -> 1
or -> 0), SW of the final samples to P, the mass on the three weak modes; beside the plain 6-step ODE sampler and a
fixed restart sampler (2 restarts from t_3 to t_1) at the same grid.

`--reward terminal` is the variant this project proposes: the costs telescope to the episode's end, so the only cost
is f'(e^d) of the final sample (d a discriminator of final samples against data), given to every action of the
episode, instead of a cost per visited state; `--model exact` gives the controller the target's own score, so that
the only error left is the coarse grid's discretisation, the error restart sampling is meant to correct.
"""

from __future__ import annotations

import argparse
import math

import torch

from rewardtune.algorithms.policy_gradient import ppo_clip_loss
from rewardtune.f_divergences import get_f_divergence, ratio_from_logit
from rewardtune.metrics.sliced_wasserstein import sliced_wasserstein
from rewardtune.score_sde.discriminator import TimeDiscriminator, bce_loss
from rewardtune.score_sde.gmm import DiffusedGMM, mode_masses
from rewardtune.score_sde.restart_control import (
    RestartController,
    RestartEnvironment,
    costs_to_go,
    renoise_fraction,
    roll_out,
)
from rewardtune.score_sde.sdes import make_sde
from rewardtune.score_sde.solvers import ode_heun, restart, time_grid

WEAK = [1, 4, 7]


def mixtures(sde, exact: bool = False) -> tuple[DiffusedGMM, DiffusedGMM]:
    angles = torch.arange(10) * 2 * math.pi / 10
    means = 2 * torch.stack([angles.cos(), angles.sin()], 1)
    target = DiffusedGMM(torch.full((10,), 0.1), means, torch.full((10,), 0.15**2), sde)
    weights = torch.full((10,), 0.1)
    if not exact:
        weights[WEAK] = 0.01
    return target, DiffusedGMM(weights, means, torch.full((10,), 0.15**2), sde)


def evaluate(samples: torch.Tensor, target: DiffusedGMM, reference: torch.Tensor) -> tuple[float, float]:
    n = min(len(samples), len(reference))
    sw = sliced_wasserstein(samples[:n], reference[:n], generator=torch.Generator().manual_seed(0))
    return sw, float(mode_masses(target, samples)[WEAK].sum())


def train_discriminator(disc, opt, states, times, target, generator, steps: int = 50) -> None:
    """Cross-entropy steps of d(x, t): the controller's states [N, D] at their times [N] against data diffused to the
    same times."""
    for _ in range(steps):
        idx = torch.randint(0, len(states), (512,), generator=generator)
        t = times[idx]
        x0 = target.sample(512, 0.0, generator)
        expert = target.sde.alpha(t)[:, None] * x0 + target.sde.sigma(t)[:, None] * torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
        loss = bce_loss(disc, states[idx], expert, t, t)  # policy states as "real": d ~ log p_psi / p_*
        opt.zero_grad()
        loss.backward()
        opt.step()


def episode_costs(disc, episodes, f, env, terminal: bool, target, d_opt, gen) -> torch.Tensor:
    """Costs [L, B]: f'(e^d) of every visited state, or (`terminal`) of the final sample only, on the last step."""
    if terminal:
        t_end = env.times[-1].expand(len(episodes.samples))
        train_discriminator(disc, d_opt, episodes.samples, t_end, target, gen)
        costs = torch.zeros_like(episodes.times)
        with torch.no_grad():
            costs[-1] = f.f_prime(ratio_from_logit(disc(episodes.samples, t_end)))
        return costs
    train_discriminator(disc, d_opt, episodes.states.flatten(0, 1), episodes.times.flatten(), target, gen)
    with torch.no_grad():
        logits = disc(episodes.states.flatten(0, 1), episodes.times.flatten()).view(episodes.times.shape)
        return f.f_prime(ratio_from_logit(logits))


def run(seed: int, iterations: int, divergence: str, terminal: bool, exact: bool) -> list[tuple[float, float, float]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sde = make_sde("vp")
    target, model = mixtures(sde, exact)
    env = RestartEnvironment(sde, model.score, time_grid(6, 1e-3), horizon=12)
    policy = RestartController(2).double()
    disc = TimeDiscriminator(2, hidden=64, depth=2).double()
    p_opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    f = get_f_divergence(divergence)
    reference = target.sample(2000, 0.0, torch.Generator().manual_seed(999))
    curve = []
    for _ in range(iterations):
        episodes = roll_out(env, policy, 256, gen)
        costs = episode_costs(disc, episodes, f, env, terminal, target, d_opt, gen)
        advantage = -costs_to_go(costs, 1.0)
        advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
        for _ in range(4):
            new = torch.log_softmax(policy(episodes.states.flatten(0, 1), episodes.times.flatten()), 1)
            log_prob = new.gather(1, episodes.actions.flatten()[:, None]).squeeze(1)
            loss, _, _ = ppo_clip_loss(log_prob, episodes.log_probs.flatten(), advantage.flatten(), 0.2)
            p_opt.zero_grad()
            loss.backward()
            p_opt.step()
        sw, weak = evaluate(episodes.samples, target, reference)
        curve.append((renoise_fraction(episodes), sw, weak))
    return curve


def baselines(seed: int, exact: bool) -> dict[str, tuple[float, float]]:
    sde = make_sde("vp")
    target, model = mixtures(sde, exact)
    reference = target.sample(2000, 0.0, torch.Generator().manual_seed(999))
    start = torch.randn((2000, 2), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    times = time_grid(6, 1e-3)
    plain = ode_heun(sde, model.score, start, times)
    restarted = restart(sde, model.score, start, times, t_min=float(times[3]), t_max=float(times[1]), restarts=2,
                        restart_steps=2, generator=torch.Generator().manual_seed(seed))
    return {"ODE, 6 Heun steps": evaluate(plain, target, reference),
            "restart (2 x t_3 -> t_1)": evaluate(restarted, target, reference),
            "exact target samples": evaluate(target.sample(2000, 0.0, torch.Generator().manual_seed(seed)), target, reference)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--divergence", default="kl")
    parser.add_argument("--reward", choices=["visitation", "terminal"], default="visitation")
    parser.add_argument("--model", choices=["weak_modes", "exact"], default="weak_modes")
    parser.add_argument("--plot", default="")
    args = parser.parse_args()
    exact = args.model == "exact"
    torch.set_num_threads(1)
    curves = {}
    for seed in args.seeds:
        curves[seed] = run(seed, args.iterations, args.divergence, args.reward == "terminal", exact)
        first, last = curves[seed][0], curves[seed][-1]
        print(f"seed {seed}: re-noise fraction {first[0]:.2f} -> {last[0]:.2f}, SW {first[1]:.3f} -> {last[1]:.3f}, "
              f"weak-mode mass {first[2]:.3f} -> {last[2]:.3f}", flush=True)
        for name, (sw, weak) in baselines(seed, exact).items():
            print(f"  {name}: SW {sw:.3f}, weak-mode mass {weak:.3f} (P: 0.300)")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), layout="constrained")
        for seed, curve in curves.items():
            axes[0].plot([c[0] for c in curve], label=f"seed {seed}")
            axes[1].plot([c[1] for c in curve], label=f"seed {seed}")
        axes[0].set(xlabel="iteration", ylabel="re-noise fraction", ylim=(0, 1))
        axes[1].set(xlabel="iteration", ylabel="SW of the samples to P")
        axes[0].legend(fontsize="small")
        fig.savefig(args.plot, dpi=110)


if __name__ == "__main__":
    main()
