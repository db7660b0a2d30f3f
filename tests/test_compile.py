"""``compile: true`` (``--model.compile true``): the training losses run through ``torch.compile`` under
``fit`` and compute what the eager ones compute. ``compile: step``: the whole iteration of Algorithm 1 is one
graph with no break, its functional form is the eager step bit for bit, and the eager step makes no host
sync. The fast tests use dynamo's ``aot_eager`` backend (traced forward and backward, no C++ build); the slow
one the default inductor backend."""

from __future__ import annotations

import pytest
import torch

from idql_pl.behavior import DiffusionBehavior
from idql_pl.critic import ImplicitCritic
from idql_pl.data.buffer import Batch
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, run_cli

S, A = 5, 3


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


def _tiny_idql(num_agents: int, dropout: float = 0.1):
    from functools import partial

    from idql_pl.idql import IDQL

    torch.manual_seed(0)
    model = IDQL(S, A, critic=partial(ImplicitCritic, hidden_dims=[16, 16], batch_size=8),
                 behavior=partial(DiffusionBehavior, hidden_dim=16, ff_dim=32, batch_size=8, dropout=dropout),
                 num_agents=num_agents)
    actor_opt, scheduler = model.behavior.make_optimizer(50)
    return model, [actor_opt, *model.critic.configure_optimizers()], scheduler


def _iterations(num_agents: int, functional: bool, steps: int = 3, backend=None):
    """``steps`` iterations of Algorithm 1 (IDQL.iteration) outside a Trainer; eager, or in the functional form
    of ``compile: step`` (compiled with ``backend`` if given); returns (model, optimizers, metrics)."""
    from idql_pl.data.buffer import TransitionBuffer
    from idql_pl.functional_step import prepare_functional_adam
    from tests.helpers import random_transitions

    model, opts, scheduler = _tiny_idql(num_agents)
    buf = TransitionBuffer(random_transitions(500, obs_dim=S, action_dim=A), seed=0)
    run = model.iteration
    if functional:
        model.critic.use_functional_steps("v_loss", "q_loss")
        model.behavior.use_functional_steps("loss")
        for opt in opts:
            prepare_functional_adam(opt)
        if backend:
            run = torch.compile(model.iteration, fullgraph=True, backend=backend)
    metrics = []
    for step in range(steps):
        torch.manual_seed(100 + step)  # dropout and diffusion noise
        batches = [buf.sample(8, num_agents) for _ in range(3)]
        if functional:
            out = run(batches[:2], batches[2], opts, None, model._actor_lrs(scheduler))
            scheduler.step()
            scheduler.step()
        else:
            out = run(batches[:2], batches[2], opts, scheduler)
        metrics.append(out)
    return model, opts, metrics


@pytest.mark.parametrize("num_agents", [1, 3])
def test_functional_iteration_is_the_eager_one_bit_for_bit(num_agents) -> None:
    """``compile: step``'s functional form (torch.func gradients, the functional fused Adam on the optimizers'
    own state, the LRs as a tensor) computes exactly the eager iteration: weights, EMA, target, Adam state."""
    eager, eager_opts, eager_out = _iterations(num_agents, functional=False)
    func, func_opts, func_out = _iterations(num_agents, functional=True)
    for a, b in zip(eager_out, func_out):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for (name, a), b in zip(eager.state_dict().items(), func.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(eager_opts, func_opts):
        for sa, sb in zip(a.state.values(), b.state.values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("num_agents", [1, 3])
def test_whole_iteration_compiles_to_one_graph_without_breaks(num_agents) -> None:
    """2 behavior steps + 1 critic step (V, Q, target), for K agents: one graph, no graph break (so no host
    sync either: an ``.item()``/``bool(tensor)`` would break the graph), and it trains what eager trains."""
    from idql_pl.data.buffer import TransitionBuffer
    from idql_pl.functional_step import prepare_functional_adam
    from tests.helpers import random_transitions

    model, opts, scheduler = _tiny_idql(num_agents)
    model.critic.use_functional_steps("v_loss", "q_loss")
    model.behavior.use_functional_steps("loss")
    for opt in opts:
        prepare_functional_adam(opt)
    buf = TransitionBuffer(random_transitions(500, obs_dim=S, action_dim=A), seed=0)
    batches = [buf.sample(8, num_agents) for _ in range(3)]
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.iteration)(batches[:2], batches[2], opts, None, model._actor_lrs(scheduler))
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    assert explained.graph_count == 1
    torch._dynamo.reset()
    eager, _, eager_out = _iterations(num_agents, functional=False)
    graphs: list[int] = []

    def counting_aot_eager(gm, example_inputs):  # counts compilations: one, not one per step (no recompile)
        graphs.append(len(gm.graph.nodes))
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    _iterations(num_agents, functional=True, steps=1, backend=counting_aot_eager)
    first_call = len(graphs)
    torch._dynamo.reset()
    graphs.clear()
    compiled, _, compiled_out = _iterations(num_agents, functional=True, backend=counting_aot_eager)
    assert len(graphs) == first_call, graphs  # 3 iterations, LRs changing each: compiled in the first only
    for a, b in zip(eager_out, compiled_out):
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    torch._dynamo.reset()


def test_eager_iteration_makes_no_host_sync(monkeypatch) -> None:
    """The eager iteration (the default path) never reads a tensor on the host: every host-sync entry point of
    ``Tensor`` raises while it runs."""
    model, opts, scheduler = _tiny_idql(2)
    from idql_pl.data.buffer import TransitionBuffer
    from tests.helpers import random_transitions

    buf = TransitionBuffer(random_transitions(500, obs_dim=S, action_dim=A), seed=0)
    batches = [buf.sample(8, 2) for _ in range(3)]

    def sync(*args, **kwargs):
        raise AssertionError("host sync inside the training iteration")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    out = model.iteration(batches[:2], batches[2], opts, scheduler)
    monkeypatch.undo()
    assert set(out) >= {"train/behavior/loss", "train/critic/q_loss", "train/critic/v_loss"}


def test_compile_step_under_fit_compiles_the_iteration(aot_eager, tmp_path) -> None:
    code = run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--model.compile", "step", "--run_root", tmp_path, "--run_name", "s")
    assert code == 0
    assert aot_eager == ["IDQL.iteration"]
    state = torch.load(tmp_path / "s" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 6
    assert state["optimizer_states"][0]["state"][0]["step"] == 12  # 2 behavior steps per iteration


def _static(t: torch.Tensor) -> bool:
    return getattr(t, "_dynamo_static_input_type", None) is not None


def test_compiled_optimizer_state_is_static_and_on_the_parameters_device() -> None:
    """What CUDA graphs (``compile_mode: reduce-overhead``) need to capture the step instead of skipping it for
    "mutated inputs": every tensor the functional Adam mutates (moments, step counts, LRs) and the behavior LRs
    of an iteration are static inputs on the parameters' device, also after a resume, whose checkpoint brings
    the LRs back as CPU tensors and the moments as new tensors. The "meta" device stands in for a GPU here."""
    from idql_pl.functional_step import prepare_functional_adam

    model, opts, scheduler = _tiny_idql(2)
    for opt in opts:
        prepare_functional_adam(opt)
    lrs = model._actor_lrs(scheduler)
    assert _static(lrs)
    for opt in opts:
        (group,) = opt.param_groups
        assert _static(group["lr"]) and all(_static(t) for state in opt.state.values() for t in state.values())
    saved = opts[1].state_dict()  # as a checkpoint holds it: the LR a tensor
    assert isinstance(saved["param_groups"][0]["lr"], torch.Tensor)
    on_meta = [p.detach().to("meta").requires_grad_() for p in opts[1].param_groups[0]["params"]]
    resumed = torch.optim.Adam(on_meta, lr=1.0)
    resumed.load_state_dict(saved)  # moments move to the parameters' device; the LR stays on the CPU
    assert resumed.param_groups[0]["lr"].device.type == "cpu"
    prepare_functional_adam(resumed)
    (group,) = resumed.param_groups
    assert group["lr"].device.type == "meta" and _static(group["lr"])
    for state in resumed.state.values():
        assert all(t.device.type == "meta" and _static(t) for t in state.values())
