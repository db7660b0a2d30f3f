"""Policy extraction by reweighting behavior samples (paper Alg. 2, Eq. 13; docs/fidelity.md §4)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal, Protocol

import torch
from torch import Tensor

from idql_pl.algorithm.losses import implicit_log_weights
from idql_pl.errors import ConfigError
from idql_pl.nets import per_agent

Extraction = Literal["argmax", "implicit"]
EXTRACTIONS = ("argmax", "implicit")


class BehaviorSampler(Protocol):
    def sample(self, states: Tensor, num_samples: int = 1,
               generator: torch.Generator | None = None) -> Tensor: ...


class Critic(Protocol):
    def q_target(self, states: Tensor, actions: Tensor) -> Tensor: ...
    def v(self, states: Tensor) -> Tensor: ...


def check_extraction(extraction: str, num_samples: int | Sequence[int],
                     num_agents: int | None = None) -> None:
    """A one-line error for an unknown extraction, or a candidate count (one, or one per agent) below 1."""
    if extraction not in EXTRACTIONS:
        raise ConfigError(f"unknown extraction {extraction!r}: use one of {', '.join(EXTRACTIONS)}")
    counts = [num_samples] if isinstance(num_samples, int) else list(num_samples)
    if not counts or min(counts) < 1:
        raise ConfigError(f"num_samples must be >= 1 (got {num_samples}): the paper uses 32-128")
    if not isinstance(num_samples, int) and num_agents is not None:
        per_agent(counts, num_agents, "num_samples")


def autocast_for(device: torch.device, precision: str) -> torch.autocast | nullcontext:
    """``precision``: "32" (none), "bf16", or "auto" (bf16 on CUDA, float32 elsewhere)."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def extract_actions(
    behavior: BehaviorSampler,
    critic: Critic,
    states: Tensor,
    num_samples: int | Sequence[int] | Tensor,
    extraction: Extraction = "argmax",
    value_loss: str = "expectile",
    loss_param: float | Tensor = 0.7,
    generator: torch.Generator | None = None,
    precision: str = "auto",
) -> Tensor:
    """One action per state: draw N candidates from the EMA behavior model, score them with
    ``min(Q1_target, Q2_target)`` and keep the argmax, or resample one with probability
    ``w / sum(w)`` where ``w`` are the implicit-actor weights (Eq. 8-12) of ``u = Q - V`` (normalized in log
    space, so the exponential weights cannot overflow).

    Agent-batched: ``states [K, B, S]`` (or ``[B, S]``, the same states for every agent), candidates
    ``[K, B, N, A]``, each agent's own Q and V score its own candidates, output ``[K, B, A]``; ``loss_param``
    a float or per-agent ``[K, 1]`` values. All agents x states x N candidates x T diffusion steps run as one
    batch, under ``precision``'s autocast (bf16 on CUDA by default); the candidates are scored, and returned,
    in float32.

    ``num_samples`` may be one count per agent (a sweep over N, paper App. D.2): all agents then draw
    ``max(N)`` candidates and agent ``k`` extracts from its first ``N_k`` (the others are masked out). An
    integer tensor ``[K, B]`` on the CPU gives one count per agent and state (several N evaluated side by
    side): one sampler call then draws each state's own N candidates (:func:`ragged_candidates`), and each
    state extracts from its own N, the others masked out as above.
    """
    own_counts = None
    if isinstance(num_samples, Tensor):  # [K, B] counts per agent and state
        check_extraction(extraction, int(num_samples.min()))
        counts, num_samples = num_samples.cpu(), int(num_samples.max())
        own_counts = counts.to(states.device).unsqueeze(-1)  # row b of agent k keeps its first N
        states = states.expand(counts.shape[0], *states.shape[-2:])
        candidates, q = ragged_candidates(behavior, critic, states, counts, generator, precision)
    else:
        check_extraction(extraction, num_samples)
        if not isinstance(num_samples, int):
            counts = [int(n) for n in num_samples]
            num_samples = max(counts)
            if min(counts) < num_samples:  # [K, 1, N]: which of the max(N) candidates each agent keeps
                own_counts = torch.tensor(counts, device=states.device).view(-1, 1, 1)
        # bf16 (on CUDA by default) for the T denoising passes only
        with autocast_for(states.device, precision):
            candidates = behavior.sample(states, num_samples, generator=generator).float()  # [K, B, N, A]
        # Candidates are scored in float32: at Q ~ 60 a bf16 step is 0.25-0.5, enough to change the argmax.
        agents, batch, _, action_dim = candidates.shape
        obs_dim = states.shape[-1]
        states = states.expand(agents, batch, obs_dim)
        flat_states = (states.unsqueeze(2).expand(agents, batch, num_samples, obs_dim)
                       .reshape(agents, -1, obs_dim))
        q = critic.q_target(flat_states,
                            candidates.reshape(agents, -1, action_dim)).view(agents, batch, num_samples)
    agents, batch, _, action_dim = candidates.shape
    dropped = None if own_counts is None else torch.arange(num_samples, device=states.device) >= own_counts
    if extraction == "argmax":
        index = (q if dropped is None else q.masked_fill(dropped, -torch.inf)).argmax(dim=-1)
    else:
        u = q - critic.v(states).unsqueeze(-1)
        param = loss_param.view(-1, 1, 1) if isinstance(loss_param, Tensor) else loss_param
        log_w = implicit_log_weights(u, value_loss, param)
        log_w = log_w if dropped is None else log_w.masked_fill(dropped, -torch.inf)
        probs = torch.softmax(log_w, dim=-1)  # w / sum(w), no overflow
        index = torch.multinomial(probs.view(-1, num_samples), 1, generator=generator).view(agents, batch)
    rows = candidates.reshape(agents * batch, num_samples, action_dim)
    picked = rows[torch.arange(agents * batch, device=states.device), index.reshape(-1)]
    return picked.view(agents, batch, action_dim)


def ragged_candidates(behavior: BehaviorSampler, critic: Critic, states: Tensor, counts: Tensor,
                      generator: torch.Generator | None = None,
                      precision: str = "auto") -> tuple[Tensor, Tensor]:
    """Each state's own number of candidates from ONE sampler call, and their ``min(Q1_target, Q2_target)``.

    ``states [K, B, S]``, ``counts [K, B]`` (CPU integers). With ``g`` the greatest common divisor of the
    counts, state ``b`` of agent ``k`` is repeated ``counts[k, b] / g`` times and every repeat draws ``g``
    candidates, so the sampler draws exactly ``sum(counts)`` candidates per agent (agents with fewer get
    padding repeats, dropped), not ``B x max(counts)``. Returns ``[K, B, max N, A]`` candidates and
    ``[K, B, max N]`` scores; position ``n >= counts[k, b]`` holds zeros and a score of ``-inf``.
    """
    agents, batch, obs_dim = states.shape
    device = states.device
    unit = math.gcd(*(int(c) for c in counts.unique()))
    repeats = counts // unit  # [K, B] repeats of each state
    rows = int(repeats.sum(dim=1).max())
    source = torch.zeros(agents, rows, dtype=torch.long)  # the state each repeat samples for
    valid = torch.zeros(agents, rows, dtype=torch.bool)
    for k in range(agents):  # host-side index building, once per call (K is small)
        index = torch.repeat_interleave(torch.arange(batch), repeats[k])
        source[k, : len(index)], valid[k, : len(index)] = index, True
    first = torch.cumsum(repeats, dim=1) - repeats  # [K, B] the first repeat of each state
    rank = torch.arange(rows).expand(agents, rows) - torch.gather(first, 1, source)  # within its state
    max_n = int(counts.max())
    # [K, rows, g]: each drawn candidate's slot in the [B x max N] output
    dest = (source * max_n + rank * unit).unsqueeze(-1) + torch.arange(unit)
    # padding repeats go to the spare last slot, dropped on return
    dest = torch.where(valid.unsqueeze(-1), dest, batch * max_n).reshape(agents, -1).to(device)
    repeated = torch.gather(states, 1, source.to(device).unsqueeze(-1).expand(agents, rows, obs_dim))
    with autocast_for(device, precision):  # bf16 (on CUDA by default) for the T denoising passes only
        drawn = behavior.sample(repeated, unit, generator=generator).float()  # [K, rows, g, A]
    action_dim = drawn.shape[-1]
    flat_states = repeated.unsqueeze(2).expand(agents, rows, unit, obs_dim).reshape(agents, -1, obs_dim)
    scores = critic.q_target(flat_states, drawn.reshape(agents, -1, action_dim))  # [K, rows x g], float32
    q = torch.full((agents, batch * max_n + 1), -torch.inf, device=device).scatter_(1, dest, scores)
    candidates = torch.zeros(agents, batch * max_n + 1, action_dim, device=device)
    candidates.scatter_(1, dest.unsqueeze(-1).expand(-1, -1, action_dim),
                        drawn.reshape(agents, -1, action_dim))
    return (candidates[:, :-1].view(agents, batch, max_n, action_dim), q[:, :-1].view(agents, batch, max_n))
