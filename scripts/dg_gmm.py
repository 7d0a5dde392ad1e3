"""Discriminator guidance on the exact diffused-GMM harness (issue W2 6/8; the boosting thesis's toy, Sec. 3.1).

    python scripts/dg_gmm.py [--seeds 0 1 2] [--data 2000] [--steps 3000] [--plot docs/img/dg_gmm.png]
        [--weighting sigma2|likelihood] [--time-sampling uniform|importance] [--rejection [--budgets 2 5]]

The target P is a mixture of four Gaussians; the frozen model P~ has the same components but misses mass on one of
them (weight 0.02 instead of 0.25) and has its others slightly off. Both are diffused exactly by the sub-VP SDE, so
the model's score and the exact correction grad log(p_t / p~_t) are known. For each seed, three discriminators
d_phi(x, t) are trained on a fixed set of `--data` samples of P (the finite training set the thesis's Thm 6 is about)
against fresh model samples: BCE (Kim et al. 2023), the DSM residual J_MSE, and the hybrid J_MSE + J_CE. Printed:
- the gradient MSE of grad_x d_phi against the exact correction, E_{p_t} ||.||^2 averaged over t in {0.1, ..., 0.9};
- the guided PF-ODE sampler (Heun, 60 steps, started from P diffused to t = 1 as the thesis does, w = 1): SW to P and
  the mass on the missing mode, beside the unguided model and the exact guidance.
With --rejection, the same discriminators (and the exact log-ratio) also post-process the model's own samples by
rejection (rewardtune/rejection.py): DRS (gamma = 0, M from a calibration batch) and OBRS at each budget K, with the
log-ratio read at the smallest training time, d_phi(x, t_min) (any constant offset cancels in both rules): SW to P,
the missing mode's mass and the acceptance rate of the kept samples.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from rewardtune.metrics.sliced_wasserstein import sliced_wasserstein
from rewardtune.rejection import acceptance_rule, rejection_sample
from rewardtune.score_sde.discriminator import TimeDiscriminator, discriminator_loss
from rewardtune.score_sde.gmm import (
    DiffusedGMM,
    gradient_mse,
    log_ratio,
    log_ratio_gradient,
    mode_masses,
)
from rewardtune.score_sde.sdes import make_sde
from rewardtune.score_sde.solvers import guided_score, ode_heun, time_grid
from rewardtune.score_sde.time_sampling import SAMPLINGS, WEIGHTINGS, TimeSampler

MISSING = 3  # the mode the model under-weights
T_MIN = 1e-3  # the smallest time the discriminators train on (discriminator_loss's t_min) and the samplers end at
KINDS = ("bce", "dsm_residual", "hybrid")


def target_and_model(sde) -> tuple[DiffusedGMM, DiffusedGMM]:
    means = torch.tensor([[1.5, 1.5], [-1.5, 1.5], [-1.5, -1.5], [1.5, -1.5]])
    target = DiffusedGMM(torch.full((4,), 0.25), means, torch.full((4,), 0.1), sde)
    model = DiffusedGMM(torch.tensor([0.33, 0.33, 0.32, 0.02]), means * 1.05, torch.full((4,), 0.13), sde)
    return target, model


def train(kind: str, target: DiffusedGMM, model: DiffusedGMM, sde, data: torch.Tensor, steps: int, seed: int,
          times: TimeSampler | None = None) -> TimeDiscriminator:
    torch.manual_seed(seed)
    disc = TimeDiscriminator(2).double()
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        real0 = data[torch.randint(0, len(data), (256,), generator=gen)]
        fake0 = model.sample(256, 0.0, gen)
        loss = discriminator_loss(kind, disc, model.score, sde, real0, fake0, gen, times=times)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return disc.eval()


def correction_error(disc: TimeDiscriminator | None, target: DiffusedGMM, model: DiffusedGMM, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed + 7)
    errors = []
    for t in torch.arange(0.1, 1.0, 0.1, dtype=torch.float64):
        x = target.sample(2000, t, gen)
        exact = log_ratio_gradient(target, model, x, t)
        learned = disc.input_gradient(x, t.expand(len(x))) if disc is not None else torch.zeros_like(x)
        errors.append(gradient_mse(lambda _, e=exact: e, lambda _, g=learned: g, x))
    return sum(errors) / len(errors)


def guided_samples(correction, target: DiffusedGMM, model: DiffusedGMM, sde, seed: int) -> torch.Tensor:
    start = target.sample(5000, 1.0, torch.Generator().manual_seed(seed + 11))
    score = model.score if correction is None else guided_score(model.score, correction)
    return ode_heun(sde, score, start, time_grid(60, 1e-3))


def rejection_rows(ratios: dict, target: DiffusedGMM, model: DiffusedGMM, reference: torch.Tensor, seed: int,
                   budgets: list[float]) -> dict[str, tuple[float, float, float]]:
    """{"<ratio>, DRS" / "<ratio>, OBRS K=k": (SW to P, mass on the missing mode, acceptance rate)} of 5,000 samples
    kept from the model's by each rule, for each log-ratio function in `ratios` (x [N, 2] -> log r [N])."""
    gen = torch.Generator().manual_seed(seed + 23)
    rows = {}
    for name, ratio in ratios.items():
        calibration = ratio(model.sample(20000, 0.0, gen))
        rules = {"DRS": acceptance_rule("drs", calibration)}
        rules.update({f"OBRS K={k:g}": acceptance_rule("budgeted", calibration, budget=k) for k in budgets})
        def propose(n: int, ratio=ratio) -> tuple[torch.Tensor, torch.Tensor]:
            x = model.sample(n, 0.0, gen)
            return x, ratio(x)

        for rule_name, accept in rules.items():
            kept, _ = rejection_sample(propose, accept, 5000, gen, batch=5000)
            sw = sliced_wasserstein(kept, reference, generator=torch.Generator().manual_seed(seed))
            rate = float(accept(calibration.double()).mean())  # E_P~[a], on the calibration batch
            rows[f"{name}, {rule_name}"] = (sw, float(mode_masses(target, kept)[MISSING]), rate)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--plot", default="")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="sigma2", help="lambda(t) of the DSM residual")
    parser.add_argument("--time-sampling", choices=SAMPLINGS, default="uniform")
    parser.add_argument("--rejection", action="store_true", help="also rejection sampling by each log-ratio")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 5.0], help="OBRS budgets K")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sde = make_sde("subvp")
    target, model = target_and_model(sde)
    times = None
    if (args.weighting, args.time_sampling) != ("sigma2", "uniform"):
        times = TimeSampler(sde, weighting=args.weighting, sampling=args.time_sampling)
    reference = target.sample(5000, 0.0, torch.Generator().manual_seed(999))
    rows: dict[str, list[tuple[float, float, float]]] = {}
    rejected: dict[str, list[tuple[float, float, float]]] = {}
    pictures = {}
    for seed in args.seeds:
        data = target.sample(args.data, 0.0, torch.Generator().manual_seed(seed))
        guides = {"unguided": None, "exact guidance": lambda x, t: log_ratio_gradient(target, model, x, t)}
        errors = {"unguided": correction_error(None, target, model, seed), "exact guidance": 0.0}
        ratios = {"exact": lambda x: log_ratio(target, model, x, 0.0)}
        for kind in KINDS:
            disc = train(kind, target, model, sde, data, args.steps, seed, times)
            guides[kind] = lambda x, t, d=disc: d.input_gradient(x, t.expand(len(x)))
            errors[kind] = correction_error(disc, target, model, seed)
            ratios[kind] = lambda x, d=disc: d(x, torch.full((len(x),), T_MIN, dtype=x.dtype)).detach().view(-1)
        if args.rejection:
            for name, row in rejection_rows(ratios, target, model, reference, seed, args.budgets).items():
                rejected.setdefault(name, []).append(row)
        for name, correction in guides.items():
            x = guided_samples(correction, target, model, sde, seed)
            sw = sliced_wasserstein(x, reference, generator=torch.Generator().manual_seed(seed))
            mass = float(mode_masses(target, x)[MISSING])
            rows.setdefault(name, []).append((errors[name], sw, mass))
            if seed == args.seeds[0]:
                pictures[name] = x
        print(f"seed {seed}: " + ", ".join(f"{n}: gradMSE {r[-1][0]:.3f} SW {r[-1][1]:.3f} mass {r[-1][2]:.3f}"
                                          for n, r in rows.items()), flush=True)
    print("\n| sampler | gradient MSE of the correction | SW to P | mass on the missing mode (P: 0.25, P~: 0.02) |")
    print("|---|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(mean_spread([v[i] for v in values]) for i in range(3)) + " |")
    if rejected:
        print("\n| rejection of the model's samples | SW to P | mass on the missing mode | acceptance rate |")
        print("|---|---|---|---|")
        for name, values in rejected.items():
            print(f"| {name} | " + " | ".join(mean_spread([v[i] for v in values]) for i in range(3)) + " |")
    if args.plot:
        plot(pictures, reference, args.plot)


def mean_spread(column: list[float]) -> str:
    spread = statistics.stdev(column) if len(column) > 1 else 0.0
    return f"{statistics.mean(column):.3f} ± {spread:.3f}"


def plot(pictures: dict[str, torch.Tensor], reference: torch.Tensor, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pictures), figsize=(3.2 * len(pictures), 3.4), layout="constrained")
    for ax, (name, x) in zip(axes, pictures.items(), strict=True):
        ax.scatter(reference[:1500, 0], reference[:1500, 1], s=1, c="tab:gray", alpha=0.3, label="P")
        ax.scatter(x[:1500, 0], x[:1500, 1], s=1, c="tab:blue", alpha=0.5, label="samples")
        ax.set_title(name, fontsize="medium")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
    axes[0].legend(loc="upper left", markerscale=6, fontsize="small")
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
