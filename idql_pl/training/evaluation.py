"""PolicyEvaluation: roll the extracted policy out in the real environment and log the D4RL score."""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from idql_pl.algorithm.extraction import Extraction, autocast_for, check_extraction
from idql_pl.errors import ConfigError
from idql_pl.training.video import (
    first_frame,
    log_videos,
    prepare_offscreen_rendering,
    set_frame_size,
    write_mp4,
)

Policy = Callable[[Tensor, torch.Generator], Tensor]


def rollout(env: Any, policy: Policy, seeds: list[int], device: torch.device, generator: torch.Generator,
            num_agents: int = 1, record: int = 0, frames: dict[int, list[np.ndarray]] | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Run one episode per seed and agent on a vector env of ``num_agents x n`` envs (agent-major: envs
    ``k n .. k n + n - 1`` are agent ``k``'s), ``n`` episodes at a time; every agent plays the same seeds.
    (The "agents" are any groups that play the same episodes side by side: agents, or N settings x agents.)

    ``policy(states [K, c, S], generator) -> [K, c, A]`` gets, for each agent, the ``c`` env slots where any
    agent's episode is still running (one batched call for all agents; a slot some agent has finished is
    computed and its action ignored). Returns per-episode undiscounted returns and lengths,
    ``[K, len(seeds)]`` in ``seeds`` order. Steps of finished envs (auto-reset by the vector env) are ignored.

    ``record``: the first ``record`` episodes of agent 0 are rendered into ``frames[i]`` (``i``: the position
    in ``seeds``): their env's ``render()`` after the reset and after every step of the episode; no other env
    renders. The vector env must be a ``SyncVectorEnv`` whose first ``min(record, n)`` envs render frames.
    """
    if env.num_envs % num_agents:
        raise ValueError(f"rollout: {env.num_envs} envs do not split into {num_agents} agents")
    n_envs = env.num_envs // num_agents
    action_shape = env.single_action_space.shape
    returns = np.zeros((num_agents, len(seeds)))
    lengths = np.zeros((num_agents, len(seeds)), dtype=np.int64)
    frames = {} if frames is None else frames
    for start in range(0, len(seeds), n_envs):
        chunk = seeds[start : start + n_envs]
        padded = chunk + [chunk[-1] + 1_000_003 + i for i in range(n_envs - len(chunk))]
        obs, _ = env.reset(seed=padded * num_agents)
        recorded = [j for j in range(len(chunk)) if start + j < record]  # agent 0's env slots to render
        for j in recorded:
            frames[start + j] = [env.envs[j].render()]
        active = np.tile(np.arange(n_envs) < len(chunk), (num_agents, 1))  # [K, n]
        ret, length = np.zeros((num_agents, n_envs)), np.zeros((num_agents, n_envs), dtype=np.int64)
        while active.any():
            slots = active.any(axis=0)
            actions = np.zeros((num_agents, n_envs, *action_shape), dtype=np.float32)
            grid = np.asarray(obs).reshape(num_agents, n_envs, *np.shape(obs)[1:])
            states = torch.as_tensor(grid[:, slots], dtype=torch.float32, device=device)
            actions[:, slots] = policy(states, generator).cpu().numpy()
            actions[~active] = 0.0
            obs, reward, terminated, truncated, _ = env.step(
                actions.reshape(num_agents * n_envs, *action_shape))
            reward = np.asarray(reward).reshape(num_agents, n_envs)
            ret[active] += reward[active]
            length[active] += 1
            for j in recorded:
                if active[0, j]:
                    frames[start + j].append(env.envs[j].render())
            active &= ~(np.asarray(terminated) | np.asarray(truncated)).reshape(num_agents, n_envs)
        returns[:, start : start + len(chunk)] = ret[:, : len(chunk)]
        lengths[:, start : start + len(chunk)] = length[:, : len(chunk)]
    return returns, lengths


def interquartile_mean(values: np.ndarray) -> float:
    """Mean of the middle 50% (the IQM of Agarwal et al. 2021): sorted values with weight 1 inside the
    quartiles and fractional weights at their edges, so it is defined for any number of values."""
    x = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))
    n = len(x)
    lo, hi = 0.25 * n, 0.75 * n
    weights = np.clip(np.minimum(np.arange(1, n + 1), hi) - np.maximum(np.arange(n), lo), 0.0, 1.0)
    return float((weights * x).sum() / weights.sum())


def resident_memory_mb() -> float:
    """Current resident set size of this process (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def autocast_sample(behavior: Any, states: Tensor, generator: torch.Generator, precision: str) -> Tensor:
    """One behavior-policy sample per state and agent (behavior cloning): ``[K, B, S] -> [K, B, A]``,
    float32."""
    with torch.no_grad(), autocast_for(states.device, precision):
        return behavior.sample(states, 1, generator=generator)[..., 0, :].float()


def gather_episodes(strategy: Any, episodes: np.ndarray, returns: np.ndarray, lengths: np.ndarray, share: int,
                    device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Every rank's episodes (a collective under DDP: every rank calls it, ``share`` the same on all of them).

    Each rank sends one fixed-shape float64 tensor ``[share, 2 + 2K]`` (rows: valid flag, episode index, its
    ``K`` returns, its ``K`` lengths; rows past its own episodes are padding with flag 0) through
    ``strategy.all_gather``, so a rank with fewer episodes than the others, or none at all, sends the same
    shape and dtype as every other rank. Returns the valid rows sorted by episode: indices ``[E]`` (int64),
    returns and lengths ``[K, E]`` (float64), the same on every rank. ``returns``/``lengths`` are ``[K, n]``
    with ``n = len(episodes) <= share``."""
    agents, n = returns.shape[0], len(episodes)
    if n > share:
        raise ValueError(f"gather_episodes: {n} episodes on this rank, more than the share of {share}")
    rows = torch.zeros((share, 2 + 2 * agents), dtype=torch.float64)
    rows[:n, 0] = 1.0
    rows[:n, 1] = torch.as_tensor(episodes, dtype=torch.float64)
    rows[:n, 2 : 2 + agents] = torch.as_tensor(returns, dtype=torch.float64).reshape(agents, n).T
    rows[:n, 2 + agents :] = torch.as_tensor(lengths, dtype=torch.float64).reshape(agents, n).T
    gathered = strategy.all_gather(rows.to(device)).reshape(-1, rows.shape[1])  # [world * share, 2 + 2K]
    valid = gathered[gathered[:, 0] > 0]
    valid = valid[torch.argsort(valid[:, 1], stable=True)]
    returns_, lengths_ = valid[:, 2 : 2 + agents].T.contiguous(), valid[:, 2 + agents :].T.contiguous()
    return valid[:, 1].long(), returns_, lengths_


class PolicyEvaluation(L.Callback):
    """Every ``every_n_steps`` (and at the last step, and on ``validate``), run ``num_episodes`` episodes.

    Episode ``i`` is seeded ``seed + i`` (the same episodes at every evaluation); diffusion noise comes from
    a generator seeded by the step, so evaluation never perturbs the training RNG. Under DDP rank ``r`` runs
    episodes ``r, r + world, ...`` (none when ``num_episodes`` < world size) and :func:`gather_episodes`
    collects every rank's, so the logged mean covers exactly ``num_episodes``, each episode once. Logs
    ``eval/return``, ``eval/normalized_score`` (0-100, the dataset's reference scores),
    ``eval/episode_length``, ``perf/eval_env_steps_per_s``; writes ``eval_curve.png`` to the run dir (x axis:
    the module's ``step_unit``). ``at_start`` also evaluates the starting weights as step 0. ``validate`` and
    ``test`` of a checkpoint evaluate at the checkpoint's step (so validating a run's checkpoint replays the
    fit's evaluation at that step, episode for episode), tag their ``eval_episodes.csv`` rows with their stage
    and leave ``eval_curve.png`` alone.

    A model of K agents (``num_agents``) plays the same seeded episodes with every agent, all agents in one
    batched policy call over ``K x num_envs`` envs. ``eval/normalized_score`` is then the mean over agents of
    each agent's mean score, beside ``eval/agent{k}/normalized_score``, ``eval/normalized_score_agent_std``
    (across agents) and ``eval/normalized_score_iqm`` (interquartile mean of the agents' scores);
    ``eval_episodes.csv`` has an ``agent`` column and the curve shows every agent and the mean.

    ``num_samples``: the candidates per state N (paper Alg. 2; default: the model's own). A list (``[16, 64,
    256]``) plays the same seeded episodes once per N, side by side, each N with its own envs: every env step
    draws every state's own N candidates, for all N settings (and agents), in one batched sampler call
    (:func:`~idql_pl.algorithm.extraction.extract_actions` with one count per state). It logs
    ``eval/N{n}/return`` and ``eval/N{n}/normalized_score`` (and ``eval/N{n}/agent{k}/normalized_score`` for
    K > 1) per listed N, and the usual ``eval/*`` metrics for the model's own N (that N's episodes when it is
    listed, else one more setting played beside them). ``eval_episodes.csv`` records each row's N
    (``num_samples``) and whether it is the model's own (``model_n``); the curve shows each N.

    ``video_episodes``: the first episodes of each evaluation (of the model's own N, agent 0, this process's
    share under DDP: rank 0) rendered offscreen (``render_mode="rgb_array"``; MuJoCo through ``MUJOCO_GL=egl``
    when no display is set) at ``video_size`` pixels, written to ``videos/step{step}_ep{i}.mp4`` in the run
    folder and logged to W&B (``eval/video``). Only those episodes' envs render; with 0, nothing renders.
    """

    def __init__(
        self,
        every_n_steps: int = 50_000,
        num_episodes: int = 10,
        num_envs: int = 10,
        num_samples: int | list[int] | None = None,
        extraction: Extraction | None = None,
        precision: Literal["auto", "32", "bf16"] = "auto",
        seed: int = 1_000_000,
        at_end: bool = True,
        plot: bool = True,
        at_start: bool = False,
        video_episodes: int = 0,
        video_size: int = 256,
    ):
        if num_episodes < 1 or num_envs < 1 or every_n_steps < 0:
            raise ConfigError("eval.num_episodes and eval.num_envs must be >= 1 and eval.every_n_steps >= 0"
                              " (0 = never)")
        if isinstance(num_samples, list | tuple) and not num_samples:
            raise ConfigError("eval.num_samples is an empty list: give one N, a list such as [16, 64, 256],"
                              " or null")
        if num_samples is not None or extraction is not None:
            check_extraction(extraction or "argmax", num_samples or 1)
        if video_episodes < 0 or video_size < 16:
            raise ConfigError(f"eval.video_episodes must be >= 0 (got {video_episodes}) and eval.video_size"
                              f" >= 16 (got {video_size})")
        if isinstance(num_samples, list | tuple):
            num_samples = list(dict.fromkeys(int(n) for n in num_samples))  # each N once, in the given order
        self.every_n_steps, self.num_episodes, self.num_envs = every_n_steps, num_episodes, num_envs
        self.num_samples, self.extraction, self.precision = num_samples, extraction, precision
        self.seed, self.at_end, self.plot, self.at_start = seed, at_end, plot, at_start
        self.video_episodes, self.video_size = video_episodes, video_size
        self.history: list[tuple[int, float]] = []  # (step, score: the mean over agents)
        self.agent_history: list[tuple[int, list[float]]] = []  # (step, each agent's score)
        self.n_history: list[tuple[int, dict[int, float]]] = []  # (step, {N: score}) for a list of N
        self._env: Any = None
        self._last_step = -1
        self._checkpoint_step: int | None = None  # global_step of the checkpoint validate/test loaded

    # ------------------------------------------------------------------------------------- triggers
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        due = self.every_n_steps and step % self.every_n_steps == 0
        last = self.at_end and trainer.max_steps > 0 and step >= trainer.max_steps
        if (due or last) and step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module, log_to_module=False)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``at_start``: evaluate the starting weights as step 0 (finetuning: the pretrained score)."""
        if self.at_start and trainer.global_step == 0 and self._last_step != 0:
            self._last_step = 0
            self.evaluate(trainer, pl_module, log_to_module=False)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module, log_to_module=True)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._checkpoint_step = int(checkpoint.get("global_step", 0))

    def _step(self, trainer: L.Trainer) -> int:
        """The training step evaluated: the trainer's under fit; under validate/test, the loaded checkpoint's
        (Lightning restores ``global_step`` for fit only), so the episodes, the policy noise and the rows
        equal those of the fit's evaluation at that step."""
        if trainer.state.fn == TrainerFn.FITTING or self._checkpoint_step is None:
            return trainer.global_step
        return self._checkpoint_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Create the envs up front, so a run that cannot be evaluated fails in seconds, not at its first
        eval."""
        if self.policy_for(pl_module) is not None and self._env is None:
            self._env = self._make_env(trainer, pl_module)

    def _envs_per_rank(self, trainer: L.Trainer) -> int:
        share = len(range(trainer.global_rank, self.num_episodes, trainer.world_size))
        return max(1, min(self.num_envs, share))

    def _recorded(self, trainer: L.Trainer) -> int:
        """How many of this process's first episodes are filmed (rank 0 films, the others never render)."""
        return self.video_episodes if trainer.is_global_zero else 0

    def _make_env(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        """``envs per rank x N settings x K agents`` envs; the first ones (the model's own N, agent 0) render
        when videos are on."""
        n = self._envs_per_rank(trainer)
        render = min(self._recorded(trainer), n)
        if render:
            prepare_offscreen_rendering()
        groups = len(self.settings(pl_module)) * num_agents_of(pl_module)
        env = trainer.datamodule.make_vector_env(n * groups, render_envs=render)
        try:
            for j in range(render):
                set_frame_size(env.envs[j], self.video_size)
            if render:
                first_frame(env.envs[0], f"the evaluation env {trainer.datamodule.info.env_id}")
        except BaseException:
            env.close()
            raise
        return env

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

    # ----------------------------------------------------------------------------------------- core
    def policy_for(self, pl_module: L.LightningModule) -> Policy | None:
        """IDQL: reweighted extraction; a behavior model alone: its own samples (BC); a critic alone: none."""
        if hasattr(pl_module, "act"):
            return lambda s, g: pl_module.act(
                s, num_samples=self.num_samples, extraction=self.extraction, generator=g,
                precision=self.precision
            )
        if hasattr(pl_module, "sample"):
            return lambda s, g: autocast_sample(pl_module, s, g, self.precision)
        return None

    def settings(self, pl_module: L.LightningModule) -> list[int | None]:
        """The N settings one evaluation plays, the model's own first (``None``: the model's own N, one per
        agent when it has a list): ``[num_samples]`` for one N (or None), else the listed N with the model's
        own N put first, or ``None`` added first when it is not listed."""
        if not isinstance(self.num_samples, list):
            return [self.num_samples]
        own = model_num_samples(pl_module)
        if own is None:
            name = type(pl_module).__name__
            raise ConfigError(f"eval.num_samples lists several N ({self.num_samples}) but {name} draws no"
                              " candidates to extract from: give one value or drop it")
        if isinstance(own, int) and own in self.num_samples:
            return [own, *(n for n in self.num_samples if n != own)]
        return [None, *self.num_samples]

    def _policy(self, pl_module: L.LightningModule, settings: list[int | None], agents: int) -> Policy | None:
        """One batched policy over ``len(settings) x agents`` groups (setting-major): each agent's states of
        all settings in one ``act`` call, each state with its setting's N candidates."""
        if len(settings) == 1:
            return self.policy_for(pl_module)
        own = model_num_samples(pl_module)
        own_per_agent = list(own) if isinstance(own, list) else [own] * agents
        counts = torch.tensor([[own_per_agent[k] if n is None else n for n in settings]
                               for k in range(agents)])  # [K, settings]

        def policy(states: Tensor, generator: torch.Generator) -> Tensor:
            count, slots, obs_dim = len(settings), states.shape[1], states.shape[2]
            grouped = states.view(count, agents, slots, obs_dim).transpose(0, 1)
            per_agent = grouped.reshape(agents, count * slots, obs_dim)
            rows = counts.repeat_interleave(slots, dim=1)  # [K, settings x slots], on the CPU (read there)
            actions = pl_module.act(per_agent, num_samples=rows, extraction=self.extraction,
                                    generator=generator, precision=self.precision)
            return actions.view(agents, count, slots, -1).transpose(0, 1).reshape(count * agents, slots, -1)

        return policy

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule,
                 log_to_module: bool) -> dict[str, float] | None:
        if self.policy_for(pl_module) is None:
            rank_zero_info(f"[eval] skipped: {type(pl_module).__name__} has no policy to roll out")
            return None
        agents = num_agents_of(pl_module)
        settings = self.settings(pl_module)
        groups = len(settings) * agents
        policy = self._policy(pl_module, settings, agents)
        datamodule = trainer.datamodule
        device = pl_module.device
        rank, world = trainer.global_rank, trainer.world_size
        seeds = [self.seed + i for i in range(rank, self.num_episodes, world)]
        frames: dict[int, list[np.ndarray]] = {}
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        try:
            if seeds:
                if self._env is None:
                    self._env = self._make_env(trainer, pl_module)
                generator = torch.Generator(device=device).manual_seed(self.seed + self._step(trainer))
                returns, lengths = rollout(self._env, policy, seeds, device, generator, groups,
                                           record=self._recorded(trainer), frames=frames)
            else:
                returns, lengths = np.zeros((groups, 0)), np.zeros((groups, 0))
        finally:
            pl_module.train(was_training)
        elapsed = time.perf_counter() - start
        share = -(-self.num_episodes // world)  # the most episodes any rank runs
        all_episodes, all_returns, all_lengths = gather_episodes(
            trainer.strategy, np.asarray(seeds, dtype=np.int64) - self.seed, returns, lengths, share, device)
        env_steps = float(all_lengths.sum())
        own_returns, own_lengths = all_returns[:agents], all_lengths[:agents]  # the model's own N (setting 0)
        metrics = {
            "eval/return": float(own_returns.mean()),
            "eval/return_std": float(own_returns.std(unbiased=False)),
            "eval/episode_length": float(own_lengths.mean()),
            "eval/num_episodes": float(own_returns.shape[1]),
            "perf/eval_env_steps_per_s": env_steps / max(elapsed, 1e-9),
            "perf/rss_mb": resident_memory_mb(),
        }
        info = datamodule.info
        scored = info.ref_min_score is not None and info.ref_max_score is not None
        agent_scores: list[float] | None = None
        if scored:
            scores = np.asarray(datamodule.normalized_score(own_returns.double().cpu().numpy()))  # [K, E]
            agent_scores = [float(np.mean(row)) for row in scores]
            metrics["eval/normalized_score"] = float(np.mean(agent_scores))
            metrics["eval/normalized_score_std"] = float(np.std(scores))
            if agents > 1:
                for k, score in enumerate(agent_scores):
                    metrics[f"eval/agent{k}/normalized_score"] = score
                metrics["eval/normalized_score_agent_std"] = float(np.std(agent_scores))
                metrics["eval/normalized_score_iqm"] = interquartile_mean(np.asarray(agent_scores))
        n_scores: dict[int, float] = {}
        if isinstance(self.num_samples, list):
            for s, n in enumerate(settings):
                if n is None:
                    continue
                rows = all_returns[s * agents : (s + 1) * agents]
                metrics[f"eval/N{n}/return"] = float(rows.mean())
                if scored:
                    normalized = datamodule.normalized_score(rows.double().cpu().numpy())
                    per_agent = np.asarray(normalized).mean(axis=1)
                    n_scores[n] = metrics[f"eval/N{n}/normalized_score"] = float(per_agent.mean())
                    if agents > 1:
                        for k, score in enumerate(per_agent):
                            metrics[f"eval/N{n}/agent{k}/normalized_score"] = float(score)
                else:
                    n_scores[n] = metrics[f"eval/N{n}/return"]
        videos = self._write_videos(trainer, frames, seeds) if frames else []
        self._report(trainer, pl_module, metrics, log_to_module, agent_scores, n_scores, videos)
        if trainer.is_global_zero:
            counts = self._counts(pl_module, settings, agents)
            self._write_episodes(trainer, all_episodes, all_returns, all_lengths, counts, agents)
        return metrics

    def _counts(self, pl_module: L.LightningModule, settings: list[int | None], agents: int
                ) -> list[int | None]:
        """The N of each group (setting-major, then agent); None where the model has no N (IQL)."""
        own = model_num_samples(pl_module)
        out = []
        for n in settings:
            for k in range(agents):
                value = (own[k] if isinstance(own, list) else own) if n is None else n
                out.append(None if value is None else int(value))
        return out

    def _write_videos(self, trainer: L.Trainer, frames: dict[int, list[np.ndarray]], seeds: list[int]
                      ) -> list[Path]:
        """The filmed episodes as ``videos/[{stage}_]step{step}_ep{i}.mp4`` in the run folder, logged to
        W&B."""
        stage = trainer.state.fn.value if trainer.state.fn else "fit"
        prefix = "" if stage == "fit" else f"{stage}_"
        folder = Path(trainer.default_root_dir) / "videos"
        fps = float((getattr(self._env.envs[0], "metadata", None) or {}).get("render_fps") or 30)
        paths, captions = [], []
        for position, episode_frames in sorted(frames.items()):
            episode = seeds[position] - self.seed
            name = f"{prefix}step{self._step(trainer)}_ep{episode}.mp4"
            paths.append(write_mp4(episode_frames, folder / name, fps))
            captions.append(f"step {self._step(trainer)}, episode {episode} (seed {seeds[position]})")
        log_videos(trainer, paths, self._step(trainer), captions)
        return paths

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, metrics: dict[str, float],
                log_to_module: bool, agent_scores: list[float] | None = None,
                n_scores: dict[int, float] | None = None, videos: list[Path] | None = None) -> None:
        step = self._step(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING  # validate/test leave the run's curve as fit drew it
        score = metrics.get("eval/normalized_score")
        if fitting and score is not None and (not self.history or self.history[-1][0] != step):
            self.history.append((step, score))
            self.agent_history.append((step, list(agent_scores or [score])))
        if fitting and n_scores and (not self.n_history or self.n_history[-1][0] != step):
            self.n_history.append((step, dict(n_scores)))
        if log_to_module:
            pl_module.log_dict(metrics, sync_dist=False)
        elif trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        text = f"return {metrics['eval/return']:.2f} ± {metrics['eval/return_std']:.2f}"
        if score is not None:
            text += f", normalized score {score:.1f} ± {metrics['eval/normalized_score_std']:.1f}"
            if agent_scores is not None and len(agent_scores) > 1:
                text += f" (agents: {', '.join(f'{a:.1f}' for a in agent_scores)})"
        if n_scores:
            text += f"; by N: {', '.join(f'N {n} {v:.1f}' for n, v in sorted(n_scores.items()))}"
        if videos:
            more = f" (+{len(videos) - 1})" if len(videos) > 1 else ""
            text += f"; video {videos[0].parent.name}/{videos[0].name}{more}"
        rank_zero_info(
            f"[eval] step {step}: {text} over {int(metrics['eval/num_episodes'])} episodes"
            f" (length {metrics['eval/episode_length']:.0f}, {metrics['perf/eval_env_steps_per_s']:.0f}"
            " env steps/s)"
        )
        if fitting and self.plot and trainer.is_global_zero and (self.history or self.n_history):
            self._plot(Path(trainer.default_root_dir) / "eval_curve.png",
                       getattr(pl_module, "step_unit", "critic steps"))

    def _write_episodes(self, trainer: L.Trainer, episodes: Tensor, returns: Tensor, lengths: Tensor,
                        counts: list[int | None] | None = None, agents: int | None = None) -> None:
        """Append one row per episode, N setting and agent (all ranks' episodes; ``returns``/``lengths``
        ``[groups, episodes]``, ``counts`` each group's N, the first ``agents`` groups the model's own N) to
        ``eval_episodes.csv`` in the run folder. A file started before the ``num_samples`` column existed
        keeps its columns and gets the model's own N only."""
        path = Path(trainer.default_root_dir) / "eval_episodes.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        agents = returns.shape[0] if agents is None else agents
        counts = [None] * returns.shape[0] if counts is None else counts
        fields = EPISODE_COLUMNS
        if path.is_file():
            with open(path, newline="") as f:
                fields = next(csv.reader(f), None) or EPISODE_COLUMNS
        new = not path.is_file() or os.path.getsize(path) == 0
        order = torch.argsort(episodes)
        stage = trainer.state.fn.value if trainer.state.fn else "fit"
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
            if new:
                writer.writeheader()
            for group in range(returns.shape[0]):
                own = group < agents
                if not own and "num_samples" not in fields:
                    continue
                n = "" if counts[group] is None else counts[group]
                ordered = (returns[group][order].tolist(), lengths[group][order].tolist())
                rows = zip(episodes[order].tolist(), *ordered)
                for e, r, length in rows:
                    writer.writerow({"stage": stage, "step": self._step(trainer), "agent": group % agents,
                                     "num_samples": n, "model_n": int(own), "episode": int(e),
                                     "seed": self.seed + int(e), "return": f"{r:.6f}", "length": int(length)})

    def _plot(self, path: Path, unit: str = "critic steps") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        per_agent = ([row for _, row in self.agent_history] if len(self.agent_history) == len(self.history)
                     else [])
        if self.n_history:  # one line per N, the model's own N in black
            for n in sorted({n for _, row in self.n_history for n in row}):
                points = [(step, row[n]) for step, row in self.n_history if n in row]
                ax.plot(*zip(*points), marker=".", lw=1.2, label=f"N {n}")
            if self.history:
                ax.plot(*zip(*self.history), color="black", lw=2, ls="--", label="model's N")
            ax.legend(fontsize=6, ncol=2)
        elif per_agent and len(per_agent[-1]) > 1:
            steps, scores = zip(*self.history)
            agent_steps = [step for step, _ in self.agent_history]
            for k in range(len(per_agent[-1])):
                ax.plot(agent_steps, [row[k] if k < len(row) else np.nan for row in per_agent], lw=0.8,
                        alpha=0.5, label=f"agent {k}")
            ax.plot(steps, scores, marker="o", color="black", lw=2, label="mean")
            ax.legend(fontsize=6, ncol=2)
        else:
            steps, scores = zip(*self.history)
            ax.plot(steps, scores, marker="o")
        ax.set_xlabel(f"{unit} (trainer.global_step)")
        ax.set_ylabel("eval/normalized_score")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(path)

    # -------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {"history": [[int(s), float(v)] for s, v in self.history],
                "agent_history": [[int(s), [float(x) for x in v]] for s, v in self.agent_history],
                "n_history": [[int(s), {str(n): float(x) for n, x in v.items()}] for s, v in self.n_history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self.agent_history = [(int(s), [float(x) for x in v]) for s, v in state_dict.get("agent_history", [])]
        self.n_history = [(int(s), {int(n): float(x) for n, x in v.items()})
                          for s, v in state_dict.get("n_history", [])]


EPISODE_COLUMNS = ["stage", "step", "agent", "num_samples", "model_n", "episode", "seed", "return", "length"]


def model_num_samples(pl_module: Any) -> int | list[int] | None:
    """The model's own N (one, or one per agent); None for a model that draws no candidates (IQL, BC)."""
    hparams = getattr(pl_module, "hparams", None) or {}
    own = hparams.get("num_samples") if hasattr(pl_module, "act") else None
    return [int(n) for n in own] if isinstance(own, list | tuple) else (None if own is None else int(own))


def num_agents_of(pl_module: Any) -> int:
    """The module's number of agents (1 for models without agents, e.g. IQL)."""
    return int(getattr(pl_module, "num_agents", 1))
