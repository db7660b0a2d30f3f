"""The diffusion behavior policy mu(a|s): DDPM behavior cloning with an EMA copy for sampling
(paper Sec. 3 Eq. 4-5, Sec. 5, App. G; docs/fidelity.md §3)."""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from idql_pl.algorithm.diffusion import (
    SCHEDULES,
    Schedule,
    ddpm_loss,
    make_schedule,
    reverse_coefficients,
    reverse_sample,
)
from idql_pl.algorithm.iteration import IDQLOptimizers, algorithm1_iteration
from idql_pl.data.buffer import Batch, TransitionBuffer
from idql_pl.errors import ConfigError
from idql_pl.models.base import IDQLModule, check_sizes, make_adam
from idql_pl.nets import (
    ACTIVATIONS,
    LNResNet,
    MLPScoreNet,
    ScoreNet,
    build_agents,
    ema_update_,
    strip_dropout_,
)

SCORE_NETS = ("ln_resnet", "mlp")


class CosineDecay:
    """LR multiplier ``0.5 (1 + cos(pi min(start + step, total) / total))``: cosine decay to 0 over
    ``total_steps`` (optax ``cosine_decay_schedule``, as the reference code; docs/fidelity.md §3). ``start``:
    the steps already taken on the same schedule (online finetuning continues the pretraining's cosine). A
    callable object, so ``LambdaLR.state_dict`` stores ``total_steps`` and ``start`` (ints) and a resumed run
    keeps them."""

    def __init__(self, total_steps: int, start: int = 0):
        self.total_steps, self.start = int(total_steps), int(start)

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(self.start + step, self.total_steps) / self.total_steps))


class DiffusionBehavior(IDQLModule):
    """DDPM behavior model ``eps_hat(a_k, k, s)`` trained by pure behavior cloning (Eq. 4; no advantage
    weights, App. F.5), an EMA copy (rate ``ema_rate`` per step; dropout removed, i.e. always the eval-mode
    network) used for all sampling, and the Eq. 5 sampler.

    Defaults are the paper's (App. E, G): T 5, vp schedule, LN-ResNet 256/1024 x 3 blocks, dropout 0.1, mish,
    AdamW lr 3e-4 with cosine decay to 0 and weight decay 0, batch 1024, EMA 0.001, actions clipped to +-1.
    Its part of Algorithm 1 (:func:`~idql_pl.algorithm.iteration.algorithm1_iteration`): a step on
    :meth:`loss`, then :meth:`ema_update`. Trained alone (``--model idql_pl.DiffusionBehavior``,
    i.e. diffusion behavior cloning), a training step is Algorithm 1 without the critic, and ``compile: true``
    compiles it.

    ``num_agents`` (K) independent behavior models train as one: every Dense of the score network (and of its
    EMA copy) is agent-batched (:class:`~idql_pl.nets.AgentLinear`, one batched matmul for all agents),
    batches are ``[K, B, ...]`` (agent ``k``'s own rows; a ``[B, ...]`` batch is shared), the loss is the sum
    over agents of each agent's Eq. 4 loss, and :meth:`sample` returns ``[K, B, N, A]``. Dropout and diffusion
    noise are drawn for all agents at once (one ``[K, ...]`` tensor from the global RNG), so agent ``k``'s
    noise is not a single run's noise; its initialization is (``seed + k``,
    :func:`~idql_pl.nets.build_agents`).
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        T: int = 5,  # noqa: N803 - the paper's symbol
        schedule: str = "vp",
        hidden_dim: int = 256,
        num_blocks: int = 3,
        ff_dim: int = 1024,
        dropout: float = 0.1,
        activation: str = "mish",
        time_dim: int = 128,
        score_net: Literal["ln_resnet", "mlp"] = "ln_resnet",
        lr: float = 3e-4,
        weight_decay: float = 0.0,
        lr_decay_steps: int | None = None,
        ema_rate: float = 0.001,
        batch_size: int = 1024,
        clip_actions: float = 1.0,
        compile: bool = False,  # noqa: A002 - the option's name on the command line
        compile_mode: str | None = None,
        num_agents: int = 1,
    ):
        super().__init__()
        check_sizes(obs_dim, action_dim, num_agents)
        if schedule not in SCHEDULES:
            raise ConfigError(f"unknown diffusion schedule {schedule!r}:"
                              f" use one of {', '.join(SCHEDULES)} (paper: vp)")
        if score_net not in SCORE_NETS:
            raise ConfigError(f"unknown score_net {score_net!r}: use one of {', '.join(SCORE_NETS)}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
        for name, value in (("T", T), ("hidden_dim", hidden_dim), ("num_blocks", num_blocks),
                            ("ff_dim", ff_dim), ("time_dim", time_dim), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"behavior {name} must be an integer >= 1 (got {value!r})")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"behavior dropout must lie in [0, 1) (got {dropout}); the paper uses 0.1")
        if not (lr > 0 and math.isfinite(lr)):
            raise ConfigError(f"behavior lr must be > 0 (got {lr}); the paper uses 3e-4")
        if weight_decay < 0:
            raise ConfigError(f"behavior weight_decay must be >= 0 (got {weight_decay}); the paper uses 0")
        if lr_decay_steps is not None and lr_decay_steps < 1:
            raise ConfigError(f"lr_decay_steps must be >= 1 or null (got {lr_decay_steps}):"
                              " null uses max_steps")
        if not 0.0 < ema_rate <= 1.0:
            raise ConfigError(f"ema_rate must lie in (0, 1] (got {ema_rate}); the paper uses 0.001")
        if not clip_actions > 0:
            raise ConfigError(f"clip_actions must be > 0 (got {clip_actions}); actions live in [-1, 1]")
        self.save_init_args(locals())

        sched = make_schedule(schedule, T)
        # Device copies (for the training loss) are derived from hparams, so not saved in checkpoints.
        self.register_buffer("betas", sched.betas, persistent=False)
        self.register_buffer("alphas", sched.alphas, persistent=False)
        self.register_buffer("alpha_bars", sched.alpha_bars, persistent=False)
        self._reverse_coefs = reverse_coefficients(sched)  # host floats for the sampler loop

        def build(k: int) -> ScoreNet:
            if score_net == "ln_resnet":
                return LNResNet(obs_dim, action_dim, hidden_dim, num_blocks, ff_dim, dropout, activation,
                                time_dim, num_timesteps=T, num_agents=k)
            return MLPScoreNet(obs_dim, action_dim, hidden_dim, num_blocks, activation, time_dim,
                               num_timesteps=T, num_agents=k)

        self.net: ScoreNet = build_agents(build, num_agents)
        # The EMA copy has its dropout removed, so it computes the eval-mode network whatever mode Lightning
        # sets (no train/eval juggling, no "modules in eval mode" warning); same parameters and state_dict
        # keys.
        self.ema_net = strip_dropout_(copy.deepcopy(self.net).requires_grad_(False))

    # ------------------------------------------------------------------------------------ utilities
    @property
    def schedule(self) -> Schedule:
        return Schedule(self.betas, self.alphas, self.alpha_bars)

    @property
    def num_agents(self) -> int:
        return int(self.hparams.get("num_agents", 1))

    # ------------------------------------------------------------------------------------- training
    def loss(self, batch: Batch, net: ScoreNet | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """DDPM loss of Eq. 4 on ``(s, a)``, summed over agents (each agent's mean over its rows); the state
        block of the first Dense is computed once per row."""
        net = self.net if net is None else net
        batch = batch.for_agents(self.num_agents)
        state_proj = net.project_state(batch.observations)
        return ddpm_loss(lambda x, k: net.forward_parts(x, state_proj, net.project_time(k)), self.schedule,
                         batch.actions, generator)

    def ema_update(self) -> None:
        """``ema <- (1 - ema_rate) ema + ema_rate online`` for all parameters in one foreach op."""
        ema_update_(self.ema_net.parameters(), self.net.parameters(), self.hparams.ema_rate)

    def make_optimizer(self, total_steps: int, start_step: int = 0,
                       state: dict[str, Any] | None = None) -> tuple[torch.optim.Optimizer, LambdaLR]:
        """AdamW (weight decay set explicitly: PyTorch's default is 0.01) and cosine decay to 0 over
        ``total_steps`` actor steps (docs/fidelity.md §3), the first ``start_step`` of which are already done.
        ``state``: an AdamW ``state_dict`` of this network to continue from (its moments and step counts; the
        learning rate and other hyperparameters stay this model's)."""
        if total_steps is None or int(total_steps) < 1:
            raise ConfigError(
                f"the behavior LR schedule needs a length (got {total_steps}): set trainer.max_steps or"
                " model.lr_decay_steps"
            )
        opt = make_adam(list(self.net.parameters()), self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if state is not None:
            groups = [{**own, "params": saved["params"]}
                      for own, saved in zip(opt.state_dict()["param_groups"], state["param_groups"],
                                            strict=True)]
            opt.load_state_dict({"state": state["state"], "param_groups": groups})
        return opt, LambdaLR(opt, CosineDecay(int(total_steps), start=int(start_step)))

    def updates_per_step(self) -> dict[str, int]:
        """One actor update per ``training_step`` (for ``perf/actor_steps_per_s``)."""
        return {"actor": 1}

    def configure_optimizers(self) -> dict[str, Any]:
        total = self.hparams.lr_decay_steps or self.trainer.max_steps
        opt, sched = self.make_optimizer(total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def update(self, batch: Batch, opt: torch.optim.Optimizer,
               scheduler: LambdaLR | None) -> dict[str, Tensor]:
        """Algorithm 1 without the critic: one behavior step on ``batch`` (Eq. 4 at the schedule's LR, then
        the EMA), eager or compiled (:meth:`~idql_pl.models.base.IDQLModule.run`); returns
        ``train/behavior/loss``."""
        metrics = self.run(algorithm1_iteration, self, None, [batch], None, IDQLOptimizers(opt, None, None),
                           self.scheduled_lrs(scheduler, 1))
        self.advance(scheduler, 1)
        return metrics

    def training_step(self, buffer: TransitionBuffer, batch_idx: int) -> None:
        """:meth:`update` on ``batch_size`` rows per agent."""
        (opt,) = self.plain_optimizers()
        self.track_losses(self.update(buffer.sample(self.hparams.batch_size, self.num_agents), opt,
                                      self.lr_schedulers()))
        self.count_step()  # Lightning's global_step + 1: one behavior (actor) step

    @torch.no_grad()
    def validation_losses(self, buffer: TransitionBuffer) -> dict[str, Tensor]:
        """Eq. 4 loss of the EMA net (no dropout) on a fixed batch with fixed k and noise; updates nothing."""
        batch = buffer.fixed_batch(self.hparams.batch_size)
        gen = torch.Generator(device=batch.actions.device).manual_seed(0)
        return {"loss": self.loss(batch, net=self.ema_net, generator=gen) / self.num_agents}

    def validation_step(self, buffer: TransitionBuffer, batch_idx: int) -> None:
        metrics = self.validation_losses(buffer)
        self.log_dict({f"val/behavior/{k}": v for k, v in metrics.items()},
                      batch_size=self.hparams.batch_size, sync_dist=True)

    # ------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, states: Tensor, num_samples: int = 1,
               generator: torch.Generator | None = None) -> Tensor:
        """``num_samples`` actions per state and agent from the EMA net (no dropout) with the Eq. 5 sampler:
        ``states [K, B, S]`` (or ``[B, S]``, the same states for every agent) ``-> [K, B, num_samples, A]`` in
        ``[-clip_actions, clip_actions]``.

        Each state is projected once; the T steps run on all ``K x B x num_samples`` candidates at once.
        Noise: ``generator`` (on ``states``' device) or the global torch RNG.
        """
        net = self.ema_net  # dropout-free: eval-mode output in any mode
        if states.dim() == 2:
            states = states.expand(self.num_agents, *states.shape)
        agents, batch = states.shape[:2]
        state_proj = net.project_state(states).unsqueeze(2)  # [K, B, 1, H], broadcast over candidates
        time_table = net.time_table().unsqueeze(1).unsqueeze(1)  # [K, 1, 1, T, H]
        dtype = states.dtype if states.is_floating_point() else torch.float32
        x_T = torch.randn(agents, batch, num_samples, self.hparams.action_dim, device=states.device,
                          dtype=dtype, generator=generator)
        return reverse_sample(
            lambda x, k: net.forward_parts(x, state_proj, time_table[..., k, :]),
            self._reverse_coefs,
            x_T,
            generator=generator,
            clip=self.hparams.clip_actions,
        )
