"""The Trainer's overhead: a DxMI iteration through `Trainer.train_step` against a hand-written loop of the same
iteration built from the same networks (issue W2 8/8: "the toolkit's overhead over a hand-written loop ... <= 1.10x").

    python scripts/bench_overhead.py [RECIPE] [--threads 2] [--steps 300] [--warmup 20] [--alternations 6]
        [--set table.key=value ...] [--json PATH] [--count-ops]

RECIPE defaults to recipes/dxmi_8gaussians.toml; it must be DxMI with a shared value/energy (the paper's 2D setup),
the closed-form entropy in the TD target, no KL safeguard and no time cost: the hand-written loop implements exactly
that iteration. Both sides are built by `build_experiment` from the recipe (so the networks, their initial weights and
the data are the same) and run in one process, alternately (A, B, A, B, ...: this machine is noisy and only ratios of
interleaved runs count): A = `Trainer.train_step`, as `rewardtune bench` steps it (lr schedule, metrics read once per iteration, finiteness check,
EMA); B = the loop below, which does the same arithmetic with plain torch: the rollout, the EBM step, the T
sequential TD steps (Eq. (10), closed-form entropy), the policy step on `policy_batch` transitions (Eq. (11)), AVR,
the cosine lr and the EMA, with fused Adam (as GradStep) and no metrics. Prints the median ms/iteration of each
side, the ratio A/B of every alternation and their median; with --count-ops first the number of tensor operations
each side dispatches per iteration (torch's profiler; independent of the machine's load).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from rewardtune.api import make_accelerator, make_trainer
from rewardtune.bench import step, without_init_from
from rewardtune.build import build_experiment
from rewardtune.recipe import load_recipe
from rewardtune.trainer import lr_multiplier


class HandWrittenDxMI:
    """The iteration of a DxMI recipe (shared value/energy, closed-form entropy, AVR, EMA) as a plain torch loop over
    the networks of `trainer` (its backbone, value and data; its own optimisers and EMA copy)."""

    def __init__(self, trainer) -> None:
        algorithm = trainer.algorithm
        cfg = algorithm.config
        if not algorithm.terminal_shared or cfg.value_entropy != "closed_form" or algorithm.reference is not None:
            raise SystemExit("the hand-written loop needs a shared value/energy, value_entropy = 'closed_form' and no "
                             "KL safeguard (recipes/dxmi_8gaussians.toml is one)")
        if cfg.time_cost != "none" or cfg.td_mode != "sequential" or trainer.backbone.output_range is not None:
            raise SystemExit("the hand-written loop needs time_cost = 'none', td_mode = 'sequential' and no output range")
        self.policy, self.value, self.data = trainer.backbone, algorithm.value, trainer.data
        self.gamma = trainer.reward.gamma
        self.tau1, self.tau2, self.alpha = algorithm.tau1, algorithm.tau2, cfg.avr_alpha
        self.policy_batch, self.batch = cfg.policy_batch or trainer.config.batch_size, trainer.config.batch_size
        self.steps_total, self.final_fraction = trainer.config.steps, trainer.config.lr_final_fraction
        self.schedule = trainer.config.lr_schedule
        self.ema_decay = trainer.config.ema_decay
        value_lr = algorithm.value.optimizer.optimizer.param_groups[0]["base_lr"]
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=value_lr, fused=True)
        self.policy_opt = torch.optim.Adam(
            [{"params": self.policy.network_parameters(), "lr": cfg.sampler_lr},
             {"params": self.policy.sigma_parameters(), "lr": cfg.sigma_lr}], fused=True)
        for opt in (self.value_opt, self.policy_opt):
            for group in opt.param_groups:
                group["base_lr"] = group["lr"]
        self.s2 = self.policy.sigma().detach().pow(2).clone()
        self.ema = [p.detach().clone() for p in self.policy.parameters()]
        self.gen = torch.Generator().manual_seed(1)
        self.step_count = 0

    def step(self) -> None:
        policy, value, T, B = self.policy, self.value, self.policy.num_steps, self.batch
        scale = lr_multiplier(self.schedule, self.step_count, self.steps_total, self.final_fraction)
        for opt in (self.value_opt, self.policy_opt):
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        real = self.data.sample(B, self.gen)
        # rollout
        with torch.no_grad():
            sigma = policy.sigma()
            x = torch.randn((B, *policy.sample_shape), generator=self.gen)
            states = [x]
            for t in range(T):
                x = policy.mean(x, torch.full((B,), t)) + sigma[t] * torch.randn(x.shape, generator=self.gen)
                states.append(x)
            states = torch.stack(states)
        # EBM step: V(., T) is the energy
        energy = value(torch.cat([real, states[-1]]), torch.full((2 * B,), T))
        e_real, e_fake = energy[:B], energy[B:]
        loss = e_real.mean() - e_fake.mean() + self.gamma * (e_real.pow(2).mean() + e_fake.pow(2).mean())
        self.value_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.value_opt.step()
        # TD steps, t = T-1 .. 0 (Eq. (10), the entropy in closed form)
        d = policy.event_dim
        with torch.no_grad():
            entropy = d * sigma.log() + 0.5 * d * math.log(2 * math.pi * math.e)  # [T]
        for t in range(T - 1, -1, -1):
            x, x_next = states[t], states[t + 1]
            with torch.no_grad():
                velocity = (x_next - x).pow(2).sum(1) / (2 * self.s2[t])
                target = value(x_next, torch.full((B,), t + 1)) - self.tau1 * entropy[t] + self.tau2 * velocity
            loss = (value(x, torch.full((B,), t)) - target).pow(2).mean()
            self.value_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.value_opt.step()
        # policy step (Eq. (11)) on policy_batch transitions
        flat = torch.randint(0, T * B, (self.policy_batch,), generator=self.gen)
        t, index = flat // B, flat % B
        x = states[t, index]
        sig = policy.sigma()[t]
        x_next = policy.mean(x, t) + sig.view(-1, 1) * torch.randn(x.shape, generator=self.gen)
        velocity = (x_next - x).pow(2).sum(1) / (2 * self.s2[t])
        loss = (value(x_next, t + 1) - self.tau1 * d * sig.log() + self.tau2 * velocity).mean()
        self.policy_opt.zero_grad(set_to_none=True)
        loss.backward(inputs=[*self.policy.network_parameters(), *self.policy.sigma_parameters()])
        self.policy_opt.step()
        # AVR and EMA
        with torch.no_grad():
            sq = (states[1:] - states[:-1]).flatten(2).pow(2).sum(2).mean(1) / d
            self.s2 = self.alpha * self.s2 + (1 - self.alpha) * sq
            self.step_count += 1
            decay = min(self.ema_decay, (1 + self.step_count) / (10 + self.step_count))
            torch._foreach_lerp_(self.ema, [p.detach() for p in policy.parameters()], 1 - decay)


def timed(step, steps: int) -> float:
    """Milliseconds per call of `step` over `steps` calls."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - start) / steps


def top_level_ops(step, calls: int = 10) -> dict[str, float]:
    """{aten op: calls per `step()`} of the operations `step` dispatches itself (not those inside another aten op),
    counted by torch's profiler over `calls` calls: the small-operation cost that a timing hides in noise."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    counts = Counter(e.name for e in prof.events() if e.name.startswith("aten::")
                     and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))
    return {name: n / calls for name, n in counts.most_common()}


def interleaved_parser(description: str, threads_default) -> argparse.ArgumentParser:
    """The options of an interleaved benchmark of a recipe (this script's and bench_threads.py's)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("recipe", nargs="?", default="recipes/dxmi_8gaussians.toml")
    parser.add_argument("--threads", type=type(threads_default), default=threads_default)
    parser.add_argument("--steps", type=int, default=300, help="timed iterations per block")
    parser.add_argument("--warmup", type=int, default=20, help="untimed iterations first")
    parser.add_argument("--alternations", type=int, default=6, help="rounds of blocks")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="TABLE.KEY=VALUE")
    parser.add_argument("--json", default=None, metavar="PATH")
    return parser


def main() -> None:
    parser = interleaved_parser(__doc__.split("\n\n")[0], 2)
    parser.add_argument("--count-ops", action="store_true", help="also count each side's tensor operations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = without_init_from(load_recipe(args.recipe, args.overrides))
    trainer = make_trainer(build_experiment(recipe), None, None, make_accelerator())
    trainer.algorithm.iteration = 10**9  # past the value warm-up: every iteration includes policy improvement
    hand = HandWrittenDxMI(make_trainer(build_experiment(recipe), None, None, make_accelerator()))
    torch.set_num_threads(args.threads)  # building may set the recipe's cpu_threads
    for _ in range(args.warmup):
        step(trainer)
        hand.step()
    if args.count_ops:
        ops = {"trainer": top_level_ops(lambda: step(trainer)), "hand_written": top_level_ops(hand.step)}
        print("top-level tensor operations per iteration: " + ", ".join(
            f"{side} {sum(counts.values()):.0f}" for side, counts in ops.items()), flush=True)
    rows = []
    for i in range(args.alternations):
        toolkit = timed(lambda: step(trainer), args.steps)
        plain = timed(hand.step, args.steps)
        rows.append({"trainer_ms": toolkit, "hand_written_ms": plain, "ratio": toolkit / plain})
        print(f"alternation {i + 1}: Trainer {toolkit:.2f} ms, hand-written {plain:.2f} ms, ratio {toolkit / plain:.3f}",
              flush=True)
    summary = {
        "recipe": args.recipe, "overrides": args.overrides, "threads": args.threads, "steps": args.steps,
        "torch": torch.__version__, "alternations": rows,
        "median_trainer_ms": statistics.median(r["trainer_ms"] for r in rows),
        "median_hand_written_ms": statistics.median(r["hand_written_ms"] for r in rows),
        "median_ratio": statistics.median(r["ratio"] for r in rows),
    }
    print(f"median over {len(rows)} alternations: Trainer {summary['median_trainer_ms']:.2f} ms, hand-written "
          f"{summary['median_hand_written_ms']:.2f} ms, ratio {summary['median_ratio']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
