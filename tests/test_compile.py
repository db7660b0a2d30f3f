"""``compile: true`` (``--model.compile true``): the training losses run through ``torch.compile`` under
``fit`` and compute what the eager ones compute. The fast tests use dynamo's ``aot_eager`` backend (traced
forward and backward, no C++ build); the slow one the default inductor backend."""

from __future__ import annotations

import pytest
import torch

from idql_pl.behavior import DiffusionBehavior
from idql_pl.critic import ImplicitCritic
from idql_pl.data.buffer import Batch
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, run_cli

S, A = 5, 3


@pytest.fixture
def aot_eager(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``torch.compile`` with the ``aot_eager`` backend; returns the names of the functions it wrapped."""
    real, wrapped = torch.compile, []

    def compile_(fn, *args, **kwargs):
        wrapped.append(getattr(fn, "__qualname__", repr(fn)))
        return real(fn, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    yield wrapped
    torch._dynamo.reset()


def _batch(n: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, S, generator=g), torch.rand(n, A, generator=g) * 2 - 1, torch.randn(n, generator=g),
                 torch.randn(n, S, generator=g), (torch.rand(n, generator=g) > 0.1).float())


def test_compile_flag_compiles_both_halves_under_fit(aot_eager, tmp_path) -> None:
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    code = run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--model.compile", "true", "--run_root", tmp_path, "--run_name", "c")
    assert code == 0
    assert sorted(aot_eager) == ["DiffusionBehavior.loss", "ImplicitCritic.q_loss", "ImplicitCritic.v_loss"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before  # the wrapped losses were traced and run


def test_without_the_flag_nothing_is_compiled(aot_eager, tmp_path) -> None:
    assert run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--run_root", tmp_path, "--run_name", "e") == 0
    assert aot_eager == []


def test_compiled_critic_update_equals_eager(aot_eager) -> None:
    torch.manual_seed(0)
    eager = ImplicitCritic(S, A, hidden_dims=(32, 32), batch_size=16)
    compiled = ImplicitCritic(S, A, hidden_dims=(32, 32), batch_size=16, compile=True)
    compiled.load_state_dict(eager.state_dict())
    compiled.setup("fit")
    assert aot_eager == ["ImplicitCritic.v_loss", "ImplicitCritic.q_loss"]
    opts = [m.configure_optimizers() for m in (eager, compiled)]
    for step in range(3):
        batch = _batch(16, step)
        outs = [m.update(batch, *o) for m, o in zip((eager, compiled), opts)]
        for k in outs[0]:
            assert torch.allclose(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-6), k
    for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), k


def test_compiled_behavior_loss_equals_eager(aot_eager) -> None:
    torch.manual_seed(0)
    model = DiffusionBehavior(S, A, hidden_dim=32, ff_dim=64, batch_size=16, dropout=0.0, compile=True)
    batch = _batch(16)
    torch.manual_seed(1)
    eager = model.loss(batch)
    model.setup("fit")
    torch.manual_seed(1)  # same diffusion steps and noise
    compiled = model.train_loss(batch)
    assert aot_eager == ["DiffusionBehavior.loss"]
    assert torch.allclose(eager, compiled, rtol=1e-5)


@pytest.mark.slow
def test_inductor_critic_update_matches_eager() -> None:
    """The default backend (inductor: generated C++ on CPU) trains the critic to the same weights."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = ImplicitCritic(S, A, hidden_dims=(64, 64), batch_size=32)
    compiled = ImplicitCritic(S, A, hidden_dims=(64, 64), batch_size=32, compile=True)
    compiled.load_state_dict(eager.state_dict())
    compiled.setup("fit")
    opts = [m.configure_optimizers() for m in (eager, compiled)]
    for step in range(5):
        for m, o in zip((eager, compiled), opts):
            m.update(_batch(32, step), *o)
    for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), k


@pytest.mark.parametrize("num_agents", [1, 3])
def test_agent_batched_losses_trace_without_graph_breaks(num_agents) -> None:
    """The training losses of K agents (what ``compile: true`` wraps) are one graph each, no graph break, at
    K = 1 and K > 1 (torch._dynamo.explain). The whole update step is not: ``Optimizer.zero_grad`` and
    ``Tensor.backward`` break the graph (torch 2.13)."""
    from idql_pl.data.buffer import TransitionBuffer
    from tests.helpers import random_transitions

    buf = TransitionBuffer(random_transitions(100, obs_dim=S, action_dim=A), seed=0)
    critic = ImplicitCritic(S, A, hidden_dims=[16, 16], num_agents=num_agents)
    behavior = DiffusionBehavior(S, A, hidden_dim=16, ff_dim=32, num_agents=num_agents)
    batch = buf.sample(8, num_agents)
    for fn in (critic.v_loss, critic.q_loss, behavior.loss):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(batch)
        assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
        assert explained.graph_count == 1
    torch._dynamo.reset()
