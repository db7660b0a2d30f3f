"""The IDQL paper's Figures 1-3 as commands:
``python -m idql_pl.figures {fig1,fig2,fig3,all} [--out DIR] [--quick]``.

Each figure writes ``<out>/figN.png`` and ``<out>/figN.json`` (the plotted numbers, the sizes used and the
wall time) and is built from the project's own parts: :class:`~idql_pl.models.critic.ImplicitCritic`,
:class:`~idql_pl.models.behavior.DiffusionBehavior` (LN-ResNet / MLP score nets),
:func:`~idql_pl.algorithm.extraction.extract_actions`, :func:`~idql_pl.algorithm.losses.value_loss`,
:func:`~idql_pl.algorithm.losses.implicit_log_weights` and the IQL baseline's
:func:`~idql_pl.models.iql.awr_loss` / :class:`~idql_pl.models.iql.GaussianActor`.

- **Fig. 1** (Sec. 1): one-step 2-D bandit, ``r(a1, a2) = a1 + a2``, behavior data in three clusters (the
  ``local/bandit`` centres and spread); an expectile critic at tau 0.9; the AWR-fitted unimodal Gaussian
  policy (IQL's actor, Eq. 3) for several inverse temperatures against IDQL's implicit extraction (Alg. 2,
  resampling N diffusion samples with the expectile weights, Eq. 9).
- **Fig. 2** (Sec. 4.1): three reward clusters (low, medium, high, additive noise); the value ``V*`` each loss
  (expectile, quantile, exponential; Eq. 1, 10, 11) learns over its parameter, and the mean/std of the reward
  under the implicit actor ``pi_imp ∝ mu |f'(u)|/|u|`` (Theorem 4.1, Eq. 8-12) at that ``V*``.
- **Fig. 3** (Sec. 5): DDPM (T = 50, App. F.3) samples on toy 2-D datasets for the MLP score net (batch 256,
  2 layers), +batch (4096), +capacity (4096, 3 layers) and the LN-ResNet with the same pattern (2 blocks, then
  3), at the same number of gradient steps; share of outlier samples (farther than ``OUTLIER_DISTANCE`` from
  every reference data point).

``--quick`` sizes each figure to well under a minute on a 2-core CPU (the tests use it). The default sizes are
the closest to the paper's that run in minutes on a CPU; each figure's JSON records them.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from idql_pl.algorithm.extraction import extract_actions
from idql_pl.algorithm.losses import implicit_log_weights, value_loss
from idql_pl.data.buffer import TransitionBuffer
from idql_pl.envs.bandit import BANDIT_CENTERS, BANDIT_RADIUS, BANDIT_STD
from idql_pl.models.behavior import DiffusionBehavior
from idql_pl.models.critic import ImplicitCritic
from idql_pl.models.iql import GaussianActor, awr_loss

FIGURES = ("fig1", "fig2", "fig3")


# ---------------------------------------------------------------------------------------------- helpers
def bandit_buffer(actions: Tensor, rewards: Tensor, seed: int = 0) -> TransitionBuffer:
    """A one-step bandit as transitions: constant state ``[0]``, every step terminal (``mask`` 0)."""
    n = actions.shape[0]
    zeros = torch.zeros(n, 1)
    return TransitionBuffer({"observations": zeros, "actions": actions, "rewards": rewards,
                             "next_observations": zeros, "masks": torch.zeros(n)}, seed=seed)


def train_critic(buffer: TransitionBuffer, steps: int, **critic_kwargs: Any) -> ImplicitCritic:
    """``steps`` critic steps (:meth:`ImplicitCritic.update`) on batches of the critic's ``batch_size``."""
    critic = ImplicitCritic(buffer.obs_dim, buffer.action_dim, **critic_kwargs)
    v_opt, q_opt = critic.configure_optimizers()
    for _ in range(steps):
        critic.update(buffer.sample(critic.hparams.batch_size), v_opt, q_opt)
    return critic.eval()


def train_behavior(buffer: TransitionBuffer, steps: int, **behavior_kwargs: Any) -> DiffusionBehavior:
    """``steps`` behavior steps (:meth:`DiffusionBehavior.update`: dropout on, cosine LR over ``steps``,
    EMA)."""
    model = DiffusionBehavior(buffer.obs_dim, buffer.action_dim, **behavior_kwargs)
    opt, sched = model.make_optimizer(steps)
    model.train()
    for _ in range(steps):
        model.update(buffer.sample(model.hparams.batch_size), opt, sched)
    return model.eval()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _write(out: Path, name: str, fig: Any, record: dict[str, Any]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=110)
    _plt().close(fig)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _chunks(total: int, chunk: int) -> list[int]:
    return [min(chunk, total - i) for i in range(0, total, chunk)]


def _round(x: Any, digits: int = 4) -> Any:
    if isinstance(x, float):
        return round(x, digits)
    if isinstance(x, dict):
        return {k: _round(v, digits) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, digits) for v in x]
    return x


# ------------------------------------------------------------------------------------------------ Fig. 1
@dataclass
class Fig1Size:
    num_data: int = 20_000
    critic_hidden: tuple[int, ...] = (256, 256)
    critic_steps: int = 3_000
    behavior_hidden: int = 64
    behavior_ff: int = 256
    behavior_blocks: int = 3
    behavior_steps: int = 3_000
    behavior_lr: float = 1e-3
    behavior_ema: float = 0.01
    actor_hidden: tuple[int, ...] = (256, 256)
    actor_steps: int = 3_000
    actor_lr: float = 1e-3
    num_candidates: int = 32
    num_eval: int = 2_000
    betas: tuple[float, ...] = (1.0, 3.0, 10.0)
    tau: float = 0.9
    T: int = 50  # noqa: N815 - the paper's symbol


FIG1_QUICK = Fig1Size(num_data=10_000, critic_hidden=(64, 64), critic_steps=1_500, behavior_hidden=64,
                      behavior_ff=256, behavior_blocks=2, behavior_steps=1_500, behavior_ema=0.02,
                      actor_hidden=(64, 64), actor_steps=1_500, actor_lr=3e-3, num_eval=1_000)


def fig1_data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Actions uniform over the three ``local/bandit`` clusters (std ``BANDIT_STD``), reward ``a1 + a2``."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.as_tensor(BANDIT_CENTERS, dtype=torch.float32)
    k = torch.randint(len(centers), (n,), generator=g)
    actions = (centers[k] + BANDIT_STD * torch.randn(n, 2, generator=g)).clamp(-1.0, 1.0)
    return actions, actions.sum(1)


def cluster_shares(actions: Tensor) -> tuple[float, float]:
    """(share within ``BANDIT_RADIUS`` of the best centre, share within it of any centre)."""
    centers = torch.as_tensor(BANDIT_CENTERS, dtype=torch.float32)
    best = int(centers.sum(1).argmax())
    dist = torch.cdist(actions.float(), centers)
    return (float((dist[:, best] <= BANDIT_RADIUS).float().mean()),
            float((dist.min(1).values <= BANDIT_RADIUS).float().mean()))


def fit_awr_gaussian(buffer: TransitionBuffer, critic: ImplicitCritic, beta: float,
                     size: Fig1Size) -> GaussianActor:
    """IQL's actor (:class:`GaussianActor`, 2x256, tanh mean) fit with :func:`awr_loss` against a fixed
    critic."""
    actor = GaussianActor(1, 2, size.actor_hidden)
    opt = torch.optim.Adam(actor.parameters(), lr=size.actor_lr)
    for _ in range(size.actor_steps):
        loss, _, _ = awr_loss(actor, critic, buffer.sample(critic.hparams.batch_size), beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return actor.eval()


def fig1(out: Path, quick: bool = False, seed: int = 0, size: Fig1Size | None = None) -> dict[str, Any]:
    size = size or (FIG1_QUICK if quick else Fig1Size())
    start = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    actions, rewards = fig1_data(size.num_data, seed)
    buffer = bandit_buffer(actions, rewards, seed)
    critic = train_critic(buffer, size.critic_steps, hidden_dims=size.critic_hidden, tau=size.tau)
    behavior = train_behavior(buffer, size.behavior_steps, T=size.T, hidden_dim=size.behavior_hidden,
                              ff_dim=size.behavior_ff, num_blocks=size.behavior_blocks, batch_size=256,
                              lr=size.behavior_lr, ema_rate=size.behavior_ema)
    state = torch.zeros(1, 1)
    methods: dict[str, dict[str, Any]] = {}

    def record(name: str, acts: Tensor, **extra: Any) -> None:
        best, inside = cluster_shares(acts)
        methods[name] = {"mean_reward": float(acts.sum(1).mean()), "best_cluster_share": best,
                         "in_any_cluster_share": inside, **extra}

    record("data", actions)
    with torch.no_grad():
        record("behavior (diffusion BC)",
               behavior.sample(state, size.num_eval, generator=torch.Generator().manual_seed(seed + 1))[0, 0])
        idql = {}
        for extraction in ("implicit", "argmax"):  # the same candidates for both (same generator seed)
            gen = torch.Generator().manual_seed(seed + 2)
            idql[extraction] = torch.cat([
                extract_actions(behavior, critic, torch.zeros(n, 1), size.num_candidates, extraction,
                                "expectile", size.tau, generator=gen)[0]  # the one agent
                for n in _chunks(size.num_eval, 250)])
        record("IDQL implicit", idql["implicit"], num_candidates=size.num_candidates)
        record("IDQL argmax", idql["argmax"], num_candidates=size.num_candidates)
    gaussians = {}
    for beta in size.betas:
        actor = fit_awr_gaussian(buffer, critic, beta, size)
        with torch.no_grad():
            mean, log_std = actor(state)
            samples = actor.sample(state, size.num_eval, generator=torch.Generator().manual_seed(seed + 3))[0]
        mean_best, _ = cluster_shares(mean)
        gaussians[beta] = (mean[0].numpy(), log_std[0].exp().numpy(), samples)
        record(f"AWR Gaussian beta={beta:g}", samples, beta=beta, mean=mean[0].tolist(),
               std=log_std[0].exp().tolist(), mean_action_in_best_cluster=bool(mean_best == 1.0),
               mean_action_reward=float(mean.sum()))
    with torch.no_grad():
        v = float(critic.v(state))
    seconds = time.perf_counter() - start

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4))
    data_np = actions[:3000].numpy()
    grid = np.linspace(-1, 1, 201)
    gx, gy = np.meshgrid(grid, grid)
    for ax in axes:
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("$a_1$")
        ax.set_ylabel("$a_2$")
        ax.contour(gx, gy, gx + gy, levels=9, colors="0.85", linewidths=0.6)
        for c in BANDIT_CENTERS:
            ax.add_patch(plt.Circle(c, BANDIT_RADIUS, fill=False, ls=":", color="0.5"))
    sc = axes[0].scatter(data_np[:, 0], data_np[:, 1], c=data_np.sum(1), s=3, cmap="viridis")
    fig.colorbar(sc, ax=axes[0], fraction=0.046, label="$r = a_1 + a_2$")
    axes[0].set_title(f"behavior data (3 clusters); expectile critic tau={size.tau}\nV(s) = {v:.3f}")
    axes[1].scatter(data_np[:, 0], data_np[:, 1], s=2, color="0.75")
    colors = plt.cm.plasma(np.linspace(0.1, 0.85, len(size.betas)))
    for color, (beta, (mean, std, _)) in zip(colors, gaussians.items()):
        density = np.exp(-0.5 * (((gx - mean[0]) / std[0]) ** 2 + ((gy - mean[1]) / std[1]) ** 2))
        axes[1].contour(gx, gy, density, levels=[math.exp(-2.0), math.exp(-0.5)], colors=[color],
                        linewidths=[1.0, 2.0])
        m = methods[f"AWR Gaussian beta={beta:g}"]
        axes[1].plot(*mean, "x", color=color, ms=9, mew=2,
                     label=f"beta={beta:g}: {m['best_cluster_share']:.0%} in best,"
                           f" {m['in_any_cluster_share']:.0%} in any cluster")
    axes[1].legend(loc="lower left", fontsize=8)
    axes[1].set_title("AWR-fitted unimodal Gaussian (IQL, Eq. 3)\n1- and 2-sigma contours, x = mean action")
    imp = idql["implicit"][:2000].numpy()
    axes[2].scatter(data_np[:, 0], data_np[:, 1], s=2, color="0.75")
    axes[2].scatter(imp[:, 0], imp[:, 1], s=3, color="tab:red")
    m = methods["IDQL implicit"]
    axes[2].set_title(f"IDQL implicit extraction, N={size.num_candidates}\n"
                      f"{m['best_cluster_share']:.0%} in best,"
                      f" {m['in_any_cluster_share']:.0%} in any cluster")
    fig.suptitle("Fig. 1: AWR's unimodal Gaussian vs IDQL's implicit-policy extraction, 2-D bandit")
    fig.tight_layout()
    rec = {"figure": "fig1", "quick": quick, "seed": seed, "wall_time_s": seconds, "sizes": asdict(size),
           "best_cluster": int(np.argmax(BANDIT_CENTERS.sum(1))), "cluster_centers": BANDIT_CENTERS.tolist(),
           "cluster_radius": BANDIT_RADIUS, "critic_v": v, "methods": methods}
    return _write(out, "fig1", fig, _round(rec))


# ------------------------------------------------------------------------------------------------ Fig. 2
@dataclass
class Fig2Size:
    num_data: int = 30_000
    num_params: int = 49
    alpha_max: float = 100.0
    critic_check_steps: int = 2_000  # ImplicitCritic fits at a few parameters (0: none)
    critic_check_lr: float = 2e-3
    critic_check_params: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        "expectile": (0.1, 0.5, 0.9), "quantile": (0.1, 0.5, 0.9), "exponential": (0.5, 1.0, 2.0)})


FIG2_QUICK = Fig2Size(num_data=6_000, num_params=15, critic_check_steps=0)
FIG2_CLUSTERS = (0.0, 0.5, 1.0)  # low, medium, high reward
FIG2_NOISE = 0.1


def fig2_data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """1-D actions ``a = c_k - 0.5 + noise`` (``c_k`` uniform over ``FIG2_CLUSTERS``, noise std
    ``FIG2_NOISE``), reward ``r(a) = a + 0.5``: the reward is the cluster's plus additive noise, and Q = r on
    every action."""
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(FIG2_CLUSTERS, dtype=torch.float64)[torch.randint(3, (n,), generator=g)]
    rewards = c + FIG2_NOISE * torch.randn(n, generator=g, dtype=torch.float64)
    return (rewards - 0.5).float().unsqueeze(1), rewards


def optimal_value(rewards: Tensor, kind: str, param: float, exp_clip: float = math.inf,
                  iters: int = 100) -> float:
    """``argmin_V mean(value_loss(r - V))`` by bisection on its derivative (each loss is convex in V), with
    ``Q(a_i) = r_i``: the value a critic learns on a one-step bandit. ``exp_clip = inf`` is the paper's linex
    (the surrogate's gradient then equals linex's); the project's critic defaults to the reference code's
    6."""
    lo, hi = float(rewards.min()) - 1.0, float(rewards.max()) + 1.0

    def slope(v: float) -> float:
        v_t = torch.tensor(v, dtype=torch.float64, requires_grad=True)
        value_loss(rewards - v_t, kind, param, exp_clip).mean().backward()
        return float(v_t.grad)

    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def implicit_actor_stats(rewards: Tensor, v: float, kind: str, param: float) -> tuple[float, float]:
    """Mean and std of r under ``pi_imp ∝ mu w(r - V)`` (Eq. 8-12), normalized in log space."""
    p = torch.softmax(implicit_log_weights(rewards - v, kind, param), dim=0)
    mean = float((p * rewards).sum())
    return mean, float((p * (rewards - mean).square()).sum().sqrt())


def _fig2_grid(kind: str, size: Fig2Size) -> list[float]:
    if kind == "exponential":
        return np.geomspace(0.1, size.alpha_max, size.num_params).tolist()
    return np.linspace(0.02, 0.98, size.num_params).tolist()


def fig2(out: Path, quick: bool = False, seed: int = 0, size: Fig2Size | None = None) -> dict[str, Any]:
    size = size or (FIG2_QUICK if quick else Fig2Size())
    start = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    actions, rewards = fig2_data(size.num_data, seed)
    curves: dict[str, dict[str, list[float]]] = {}
    for kind in ("expectile", "quantile", "exponential"):
        params = _fig2_grid(kind, size)
        values = [optimal_value(rewards, kind, p) for p in params]
        stats = [implicit_actor_stats(rewards, v, kind, p) for v, p in zip(values, params)]
        curves[kind] = {"params": params, "value": values, "pi_reward_mean": [s[0] for s in stats],
                        "pi_reward_std": [s[1] for s in stats]}
        if kind == "quantile":  # the empirical CDF at V* (should equal tau)
            curves[kind]["cdf_at_value"] = [float((rewards <= v).double().mean()) for v in values]
        # the closed form (1/alpha) log mean exp(alpha r), and the clipped surrogate
        if kind == "exponential":
            curves[kind]["log_mean_exp"] = [
                float((torch.logsumexp(p * rewards, 0) - math.log(len(rewards))) / p) for p in params
            ]
            curves[kind]["value_exp_clip_6"] = [optimal_value(rewards, kind, p, exp_clip=6.0) for p in params]
    checks: dict[str, list[dict[str, float]]] = {}
    if size.critic_check_steps:
        buffer = bandit_buffer(actions, rewards.float(), seed)
        for kind, params in size.critic_check_params.items():
            checks[kind] = []
            for p in params:
                L.seed_everything(seed, verbose=False)
                key = "alpha" if kind == "exponential" else "tau"
                critic = train_critic(buffer, size.critic_check_steps, hidden_dims=(64, 64), value_loss=kind,
                                      lr=size.critic_check_lr, **{key: p})
                with torch.no_grad():
                    critic_v = float(critic.v(torch.zeros(1, 1)))
                checks[kind].append({"param": p, "critic_v": critic_v,
                                     "exact_v": optimal_value(rewards, kind, p)})
    seconds = time.perf_counter() - start
    r_np = rewards.numpy()
    references = {"cluster_rewards": list(FIG2_CLUSTERS), "noise_std": FIG2_NOISE,
                  "reward_mean": float(r_np.mean()), "reward_max": float(r_np.max()),
                  "high_cluster_mean": float(r_np[r_np > 0.75].mean())}

    plt = _plt()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    labels = {"expectile": ("expectile tau (Eq. 1)", "tau"), "quantile": ("quantile tau (Eq. 10)", "tau"),
              "exponential": ("exponential alpha (Eq. 11)", "alpha")}
    for col, (kind, curve) in enumerate(curves.items()):
        title, xlabel = labels[kind]
        top, bottom = axes[0, col], axes[1, col]
        x = curve["params"]
        top.plot(x, curve["value"], "-", color="tab:blue", lw=2, label="V* = argmin mean f(r - V)")
        if kind == "quantile":
            top.plot(x, np.quantile(r_np, x).tolist(), "--", color="k", lw=1,
                     label="empirical tau-quantile of r")
        if kind == "exponential":
            top.plot(x, curve["value_exp_clip_6"], ":", color="tab:purple", lw=2,
                     label="surrogate with exp_clip 6 (ref. code)")
            top.set_xscale("log")
            bottom.set_xscale("log")
        if kind in checks:
            top.plot([c["param"] for c in checks[kind]], [c["critic_v"] for c in checks[kind]], "o",
                     color="tab:orange", ms=7, label=f"ImplicitCritic V ({size.critic_check_steps} steps)")
        for ref, style in ((references["reward_max"], "-."), *((c, ":") for c in FIG2_CLUSTERS)):
            top.axhline(ref, ls=style, color="0.6", lw=1)
        top.set_title(f"value learned vs {title}")
        top.set_xlabel(xlabel)
        top.set_ylabel("V*")
        top.legend(fontsize=8, loc="upper left")
        mean, std = np.array(curve["pi_reward_mean"]), np.array(curve["pi_reward_std"])
        bottom.plot(x, mean, color="tab:green", lw=2, label="E_pi_imp[r]")
        bottom.fill_between(x, mean - std, mean + std, color="tab:green", alpha=0.25, label="± std")
        for c in FIG2_CLUSTERS:
            bottom.axhline(c, ls=":", color="0.6", lw=1)
        bottom.set_title("reward under the implicit actor (Thm. 4.1 weights)")
        bottom.set_xlabel(xlabel)
        bottom.set_ylabel("reward")
        bottom.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Fig. 2: three reward clusters {FIG2_CLUSTERS} + N(0, {FIG2_NOISE}^2) noise; dotted:"
                 " cluster rewards, dash-dot: max reward")
    fig.tight_layout()
    rec = {"figure": "fig2", "quick": quick, "seed": seed, "wall_time_s": seconds, "sizes": asdict(size),
           "references": references, "curves": curves, "critic_checks": checks}
    return _write(out, "fig2", fig, _round(rec))


# ------------------------------------------------------------------------------------------------ Fig. 3
OUTLIER_DISTANCE = 0.1  # a sample farther than this from every reference data point is an outlier


def eight_gaussians(n: int, g: torch.Generator) -> Tensor:
    angles = torch.randint(8, (n,), generator=g) * (math.pi / 4)
    centers = 0.75 * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    return centers + 0.05 * torch.randn(n, 2, generator=g)


def two_moons(n: int, g: torch.Generator) -> Tensor:
    t = math.pi * torch.rand(n, generator=g)
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(t), 1.0 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    return torch.stack([(x - 0.5) / 1.7, (y - 0.25) / 1.7], 1) + 0.03 * torch.randn(n, 2, generator=g)


def spiral(n: int, g: torch.Generator) -> Tensor:
    t = torch.rand(n, generator=g).sqrt()
    r, theta = 0.1 + 0.75 * t, 3.0 * math.pi * t
    return (torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1)
            + 0.025 * torch.randn(n, 2, generator=g))


TOY_DATASETS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "eight_gaussians": eight_gaussians, "two_moons": two_moons, "spiral": spiral}


@dataclass
class Fig3Config:
    name: str
    score_net: str
    batch_size: int
    num_blocks: int  # MLP: layers; LN-ResNet: residual blocks


FIG3_CONFIGS = (
    Fig3Config("MLP", "mlp", 256, 2), Fig3Config("MLP +batch", "mlp", 4096, 2),
    Fig3Config("MLP +capacity", "mlp", 4096, 3), Fig3Config("LN-ResNet", "ln_resnet", 256, 2),
    Fig3Config("LN-ResNet +batch", "ln_resnet", 4096, 2),
    Fig3Config("LN-ResNet +capacity", "ln_resnet", 4096, 3),
)


@dataclass
class Fig3Size:
    num_data: int = 20_000
    steps: int = 1_000
    hidden: int = 64
    ff: int = 256
    lr: float = 2e-3
    ema_rate: float = 0.02
    num_samples: int = 4_000
    large_batch: int = 4096
    configs: tuple[str, ...] = tuple(c.name for c in FIG3_CONFIGS)
    datasets: tuple[str, ...] = tuple(TOY_DATASETS)
    T: int = 50  # noqa: N815 - the paper's symbol (App. F.3: T = 50 for the 2-D toys)


FIG3_QUICK = Fig3Size(num_data=10_000, num_samples=2_000, configs=("MLP", "LN-ResNet"))


def outlier_share(samples: Tensor, reference: Tensor, distance: float = OUTLIER_DISTANCE) -> float:
    """Share of ``samples`` farther than ``distance`` from every point of ``reference`` (chunked cdist)."""
    nearest = torch.cat([torch.cdist(chunk, reference).min(1).values for chunk in samples.split(1024)])
    return float((nearest > distance).float().mean())


def fig3(out: Path, quick: bool = False, seed: int = 0, size: Fig3Size | None = None) -> dict[str, Any]:
    size = size or (FIG3_QUICK if quick else Fig3Size())
    start = time.perf_counter()
    configs = [c for c in FIG3_CONFIGS if c.name in size.configs]
    results: dict[str, dict[str, Any]] = {}
    samples_for_plot: dict[tuple[str, str], np.ndarray] = {}
    for d, dataset in enumerate(size.datasets):
        g = torch.Generator().manual_seed(seed + 100 * d)
        data = TOY_DATASETS[dataset](size.num_data, g).clamp(-1.0, 1.0)
        # fresh draws for the outlier test
        reference = TOY_DATASETS[dataset](size.num_data, g).clamp(-1.0, 1.0)
        buffer = bandit_buffer(data, torch.zeros(size.num_data), seed)
        results[dataset] = {
            "data (fresh draws)": {"outlier_share": outlier_share(data[: size.num_samples], reference)}
        }
        samples_for_plot[(dataset, "data")] = data[:2000].numpy()
        for config in configs:
            L.seed_everything(seed, verbose=False)
            t0 = time.perf_counter()
            batch = config.batch_size if config.batch_size <= 256 else size.large_batch
            model = train_behavior(buffer, size.steps, T=size.T, score_net=config.score_net,
                                   hidden_dim=size.hidden, ff_dim=size.ff, num_blocks=config.num_blocks,
                                   batch_size=batch, lr=size.lr, ema_rate=size.ema_rate)
            train_s = time.perf_counter() - t0
            x = model.sample(torch.zeros(1, 1), size.num_samples,
                             generator=torch.Generator().manual_seed(seed + 1))[0, 0]
            results[dataset][config.name] = {"outlier_share": outlier_share(x, reference),
                                             "batch_size": batch, "num_blocks": config.num_blocks,
                                             "train_seconds": train_s,
                                             "parameters": sum(p.numel() for p in model.net.parameters())}
            samples_for_plot[(dataset, config.name)] = x[:2000].numpy()
    seconds = time.perf_counter() - start

    plt = _plt()
    cols = ["data", *(c.name for c in configs)]
    fig, axes = plt.subplots(len(size.datasets), len(cols),
                             figsize=(2.6 * len(cols), 2.7 * len(size.datasets)), squeeze=False)
    for i, dataset in enumerate(size.datasets):
        for j, col in enumerate(cols):
            ax = axes[i, j]
            pts = samples_for_plot[(dataset, col)]
            ax.scatter(pts[:, 0], pts[:, 1], s=1, color="0.3" if col == "data" else "tab:blue")
            ax.set_xlim(-1, 1)
            ax.set_ylim(-1, 1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
            key = "data (fresh draws)" if col == "data" else col
            share = results[dataset][key]["outlier_share"]
            if i == 0:
                ax.set_title(col if col == "data"
                             else f"{col}\n(batch {results[dataset][col]['batch_size']}, "
                             f"{results[dataset][col]['num_blocks']}"
                             f" {'blocks' if 'ResNet' in col else 'layers'})",
                             fontsize=9)
            ax.text(0.02, 0.02, f"outliers {share:.1%}", transform=ax.transAxes, fontsize=8, color="tab:red")
            if j == 0:
                ax.set_ylabel(dataset)
    fig.suptitle(f"Fig. 3: DDPM samples (T={size.T}), {size.steps} gradient steps each, width {size.hidden}"
                 f" (LN-ResNet ff {size.ff}); outlier: > {OUTLIER_DISTANCE} from every data point")
    fig.tight_layout()
    rec = {"figure": "fig3", "quick": quick, "seed": seed, "wall_time_s": seconds, "sizes": asdict(size),
           "outlier_distance": OUTLIER_DISTANCE, "results": results}
    return _write(out, "fig3", fig, _round(rec))


# ------------------------------------------------------------------------------------------------- CLI
BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {"fig1": fig1, "fig2": fig2, "fig3": fig3}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idql_pl.figures", description=__doc__.split("\n\n")[0])
    parser.add_argument("figure", choices=[*FIGURES, "all"])
    parser.add_argument("--out", default="docs/figures", help="output folder (default: docs/figures)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: each figure well under a minute on a CPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    for name in FIGURES if args.figure == "all" else (args.figure,):
        rec = BUILDERS[name](out, quick=args.quick, seed=args.seed)
        print(f"[figures] {name}: {out / name}.png, {out / name}.json ({rec['wall_time_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    from idql_pl.entrypoint import run_main

    run_main(main)
