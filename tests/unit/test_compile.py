"""``compile: true`` (``--model.compile true``): a whole training iteration is one ``torch.compile`` graph
with no break, built from the functional gradient step, which computes the eager (reference) step bit for bit;
the compiled iteration trains what the eager one trains, compiles once, and its optimizer state is what CUDA
graphs need. The fast tests use dynamo's ``aot_eager`` backend (traced forward and backward, no C++ build);
the slow one the default inductor backend."""

from __future__ import annotations

import io
from functools import partial

import pytest
import torch

from idql_pl.algorithm.iteration import IDQLOptimizers, algorithm1_iteration
from idql_pl.algorithm.steps import EagerStep, FunctionalStep, prepare_functional_adam
from idql_pl.data.buffer import Batch, TransitionBuffer
from idql_pl.models.behavior import DiffusionBehavior
from idql_pl.models.critic import ImplicitCritic
from idql_pl.models.idql import IDQL
from tests.helpers import random_transitions

S, A = 5, 3


def _batch(n: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, S, generator=g), torch.rand(n, A, generator=g) * 2 - 1,
                 torch.randn(n, generator=g), torch.randn(n, S, generator=g),
                 (torch.rand(n, generator=g) > 0.1).float())


def _buffer() -> TransitionBuffer:
    return TransitionBuffer(random_transitions(500, obs_dim=S, action_dim=A), seed=0)


def _tiny_idql(num_agents: int, dropout: float = 0.1
               ) -> tuple[IDQL, IDQLOptimizers, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    model = IDQL(S, A, critic=partial(ImplicitCritic, hidden_dims=[16, 16], batch_size=8),
                 behavior=partial(DiffusionBehavior, hidden_dim=16, ff_dim=32, batch_size=8, dropout=dropout),
                 num_agents=num_agents)
    actor_opt, scheduler = model.behavior.make_optimizer(50)
    return model, IDQLOptimizers(actor_opt, *model.critic.configure_optimizers()), scheduler






def test_compiled_critic_alone_equals_eager(aot_eager) -> None:
    """The critic trained alone (``--model idql_pl.ImplicitCritic --model.compile true``)."""
    torch.manual_seed(0)
    eager = ImplicitCritic(S, A, hidden_dims=(32, 32), batch_size=16)
    compiled = ImplicitCritic(S, A, hidden_dims=(32, 32), batch_size=16, compile=True)
    compiled.load_state_dict(eager.state_dict())
    compiled.setup("fit")
    opts = [m.configure_optimizers() for m in (eager, compiled)]
    for step in range(3):
        batch = _batch(16, step)
        outs = [m.update(batch, *o) for m, o in zip((eager, compiled), opts)]
        for k in outs[0]:
            assert torch.allclose(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-6), k
    assert len(aot_eager) == 1
    for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), k


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


def test_agent_batched_losses_trace_without_graph_breaks(num_agents: int = 2) -> None:
    """The training losses of K agents are one graph each, no graph break (one code path for every K)."""
    buf = _buffer()
    critic = ImplicitCritic(S, A, hidden_dims=[16, 16], num_agents=num_agents)
    behavior = DiffusionBehavior(S, A, hidden_dim=16, ff_dim=32, num_agents=num_agents)
    batch = buf.sample(8, num_agents)
    for fn in (critic.v_loss, critic.q_loss, behavior.loss):
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fn)(batch)
        assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
        assert explained.graph_count == 1
    torch._dynamo.reset()


def _iterations(num_agents: int, functional: bool, steps: int = 3, backend=None, after_each=None):
    """``steps`` iterations of Algorithm 1 outside a Trainer: eager, or with the functional gradient step of
    ``compile: true`` (compiled with ``backend`` if given); returns (model, optimizers, metrics)."""
    model, opts, scheduler = _tiny_idql(num_agents)
    buf = _buffer()
    step = FunctionalStep(model) if functional else EagerStep(model)
    run = algorithm1_iteration
    if functional:
        for opt in opts:
            prepare_functional_adam(opt)
        if backend:
            run = torch.compile(algorithm1_iteration, fullgraph=True, backend=backend)
    metrics = []
    for i in range(steps):
        torch.manual_seed(100 + i)  # dropout and diffusion noise
        batches = [buf.sample(8, num_agents) for _ in range(3)]
        lrs = [scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch + j) for j in range(2)]
        if functional:
            lrs = torch.tensor(lrs, dtype=torch.float64)  # as IDQLModule.scheduled_lrs gives them, compiled
        metrics.append(run(model.behavior, model.critic, batches[:2], batches[2], opts, lrs, step))
        IDQL.advance(scheduler, 2)
        if after_each is not None:
            after_each(i)
    return model, opts, metrics


def test_functional_iteration_is_the_eager_one_bit_for_bit(num_agents: int = 2) -> None:
    """``compile: true``'s functional step (torch.func gradients, the functional fused Adam on the optimizers'
    own state, the LRs as a tensor), uncompiled, computes exactly the eager iteration: weights, EMA, target,
    Adam state, metrics."""
    eager, eager_opts, eager_out = _iterations(num_agents, functional=False)
    func, func_opts, func_out = _iterations(num_agents, functional=True)
    for a, b in zip(eager_out, func_out):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for (name, a), b in zip(eager.state_dict().items(), func.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(eager_opts, func_opts):
        for sa, sb in zip(a.state.values(), b.state.values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_whole_iteration_compiles_to_one_graph_without_breaks(num_agents: int = 2) -> None:
    """2 behavior steps + V, Q, target, for K agents, compiled with ``fullgraph=True``, which raises at any
    graph break (so there is no host sync either: an ``.item()``/``bool(tensor)`` would break the graph);
    compiled in the first of several iterations whose LRs change (no recompile); and it trains what eager
    trains."""
    torch._dynamo.reset()
    eager, _, eager_out = _iterations(num_agents, functional=False)
    graphs: list[int] = []

    def counting_aot_eager(gm, example_inputs):  # counts compilations: one, not one per step (no recompile)
        graphs.append(len(gm.graph.nodes))
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(gm, example_inputs)

    first_call: list[int] = []
    compiled, _, compiled_out = _iterations(
        num_agents, functional=True, backend=counting_aot_eager,
        after_each=lambda i: first_call.append(len(graphs)) if i == 0 else None)
    assert len(graphs) == first_call[0], graphs  # 3 iterations, LRs changing each: compiled in the first only
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
    buf = _buffer()

    def sync(*args, **kwargs):
        raise AssertionError("host sync inside the training iteration")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    out = model.update(buf, opts, scheduler)
    monkeypatch.undo()
    assert set(out) >= {"train/behavior/loss", "train/critic/q_loss", "train/critic/v_loss"}


def _static(t: torch.Tensor) -> bool:
    return getattr(t, "_dynamo_static_input_type", None) is not None


def _save_and_load(obj):
    saved = io.BytesIO()
    torch.save(obj, saved)
    saved.seek(0)
    return torch.load(saved, map_location="cpu", weights_only=True)


def test_compiled_training_resumes_exactly_and_trips_the_guard(aot_eager) -> None:
    """``compile: true`` resumes as the eager run does (whose CLI resume tests/integration/test_resume.py
    runs): 4 compiled iterations in one go equal 2, then the state a checkpoint holds (weights, Adam states
    with their LR tensors, the LR schedule, the sampling generators, the RNG) loaded into a fresh model that
    compiles again, then 2 more. Then a NaN reward reaches the compiled iteration's metrics, and the
    non-finite guard names the loss (the CLI version, eager: tests/integration/test_crash_safety.py)."""
    from idql_pl.errors import NonFiniteLossError

    def fresh():
        model, opts, scheduler = _tiny_idql(2)
        model.compile_training()
        return model, opts, scheduler, _buffer()

    torch.manual_seed(7)
    straight, opts, scheduler, buf = fresh()
    for _ in range(2):
        straight.update(buf, opts, scheduler)
    ckpt = _save_and_load({"model": straight.state_dict(), "opts": [o.state_dict() for o in opts],
                           "scheduler": scheduler.state_dict(), "buffer": buf.state_dict(),
                           "rng": torch.get_rng_state()})
    for _ in range(2):
        straight.update(buf, opts, scheduler)
    resumed, opts, scheduler, buf = fresh()
    resumed.load_state_dict(ckpt["model"])
    for opt, state in zip(opts, ckpt["opts"], strict=True):
        opt.load_state_dict(state)
    scheduler.load_state_dict(ckpt["scheduler"])
    buf.load_state_dict(ckpt["buffer"])
    torch.set_rng_state(ckpt["rng"])
    for _ in range(2):
        resumed.track_losses(resumed.update(buf, opts, scheduler))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    resumed.raise_if_nonfinite()  # finite so far
    buf.data[:, S + A] = float("nan")  # every reward
    resumed.track_losses(resumed.update(buf, opts, scheduler))
    with pytest.raises(NonFiniteLossError, match="train/critic/q_loss"):
        resumed.raise_if_nonfinite()


def test_compiled_optimizer_state_is_static_and_on_the_parameters_device() -> None:
    """What CUDA graphs (``compile_mode: reduce-overhead``) need to capture the step instead of skipping it
    for "mutated inputs": every tensor the functional Adam mutates (moments, step counts, LRs) and the
    behavior LRs of an iteration are static inputs on the parameters' device, also after a resume, whose
    checkpoint brings the LRs back as CPU tensors and the moments as new tensors. The "meta" device stands in
    for a GPU here. (What ``IDQLModule.run`` does before the first compiled step; the compile itself is tested
    above.)"""
    model, opts, scheduler = _tiny_idql(2)
    model.compile_training()  # lazy: nothing is traced until the first step
    for opt in opts:
        prepare_functional_adam(opt)
    assert _static(model.scheduled_lrs(scheduler, 2))
    for opt in opts:
        (group,) = opt.param_groups
        assert _static(group["lr"]) and all(_static(t) for state in opt.state.values()
                                            for t in state.values())
    saved = _save_and_load(opts.q.state_dict())  # as a checkpoint holds it: the LR a tensor
    assert isinstance(saved["param_groups"][0]["lr"], torch.Tensor)
    on_meta = [p.detach().to("meta").requires_grad_() for p in opts.q.param_groups[0]["params"]]
    resumed = torch.optim.Adam(on_meta, lr=1.0)
    resumed.load_state_dict(saved)  # moments move to the parameters' device; the LR stays on the CPU
    assert resumed.param_groups[0]["lr"].device.type == "cpu"
    prepare_functional_adam(resumed)
    (group,) = resumed.param_groups
    assert group["lr"].device.type == "meta" and _static(group["lr"])
    for state in resumed.state.values():
        assert all(t.device.type == "meta" and _static(t) for t in state.values())
