"""CUDA-only checks (skipped without a GPU; ``make gpu-check`` runs them): the eager and compiled joint step
on the GPU with host syncs caught by CUDA's sync debug mode, a K = 3 critic on the GPU against the CPU, and a
fit."""

from __future__ import annotations

import pytest
import torch

from idql_pl.algorithm.iteration import IDQLOptimizers
from idql_pl.data.buffer import TransitionBuffer
from tests.helpers import CONFIGS, SMALL_MAZE, TINY_IDQL, TINY_TRAINER, random_transitions, run_cli
from tests.unit.test_compile import A, S, _tiny_idql

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _model_on(device: str, num_agents: int, compiled: bool = False, mode: str | None = None):
    model, _, _ = _tiny_idql(num_agents)
    model = model.to(device)
    if compiled:
        model.hparams.compile_mode = mode
        model.compile_training()
    actor_opt, scheduler = model.behavior.make_optimizer(50)
    opts = IDQLOptimizers(actor_opt, *model.critic.configure_optimizers())
    buf = TransitionBuffer(random_transitions(500, obs_dim=S, action_dim=A), device=device, seed=0)
    return model, opts, scheduler, buf


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_iteration_on_cuda_makes_no_host_sync(mode, monkeypatch) -> None:
    """After warm-up (compile, CUDA-graph capture), iterations run with ``torch.cuda.set_sync_debug_mode
    ("error")``: any host sync inside the step (``.item()``, a blocking copy) raises. With "reduce-overhead"
    CUDA graphs are really captured and none is skipped (a skip raises: ``cudagraph_or_error``), also after
    the optimizer states are reloaded from a CPU checkpoint, as a resume does."""
    import io

    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(inductor_config.triton, "cudagraph_or_error", True)
    model, opts, scheduler, buf = _model_on("cuda", 3, compiled=True, mode=mode)
    for _ in range(3):
        model.update(buf, opts, scheduler)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            out = model.update(buf, opts, scheduler)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(v).all() for v in out.values())
    for opt in opts:  # a resume: the states come back from a checkpoint loaded onto the CPU
        saved = io.BytesIO()
        torch.save(opt.state_dict(), saved)
        saved.seek(0)
        opt.load_state_dict(torch.load(saved, map_location="cpu", weights_only=True))
    model._functional_ready = False  # as in a fresh process: prepared again before the first compiled step
    for _ in range(3):
        out = model.update(buf, opts, scheduler)
    torch.cuda.synchronize()
    assert all(torch.isfinite(v).all() for v in out.values())
    if mode == "reduce-overhead":
        manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
        assert manager is not None and sum(len(nodes) for nodes in manager.roots.values()) >= 1  # recorded
        assert counters["inductor"]["cudagraph_skips"] == 0
    torch._dynamo.reset()


def test_eager_iteration_on_cuda_makes_no_host_sync() -> None:
    model, opts, scheduler, buf = _model_on("cuda", 2)
    model.update(buf, opts, scheduler)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            model.update(buf, opts, scheduler)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_critic_matches_cpu() -> None:
    """Same init and batches: a K = 3 critic trained on the GPU follows the CPU one to float tolerance."""
    cpu, cpu_opts, _, buf = _model_on("cpu", 3)
    gpu, gpu_opts, _, _ = _model_on("cuda", 3)
    for _ in range(3):
        batch = buf.sample(8, 3)
        cpu.critic.update(batch, cpu_opts.value, cpu_opts.q)
        gpu.critic.update(type(batch)(*(t.cuda() for t in batch)), gpu_opts.value, gpu_opts.q)
    for (name, a), b in zip(cpu.critic.state_dict().items(), gpu.critic.state_dict().values()):
        assert torch.allclose(a, b.cpu(), rtol=1e-4, atol=1e-5), name


def test_16_mixed_is_refused_on_cuda(tmp_path, capsys) -> None:
    """float16 with loss scaling cannot run the plain optimizer steps of Algorithm 1: one line naming
    bf16-mixed, exit 2, instead of "No inf checks were recorded" after the first step."""
    code = run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--trainer.accelerator", "gpu", "--trainer.devices", "1",
                   "--trainer.precision", "16-mixed", "--run_root", tmp_path, "--run_name", "fp16")
    assert code == 2
    assert "bf16-mixed" in capsys.readouterr().err


def test_fit_on_cuda_with_compiled_step(tmp_path) -> None:
    code = run_cli("fit", "--config", CONFIGS / "quickstart.yaml", *SMALL_MAZE, *TINY_IDQL, *TINY_TRAINER,
                   "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--model.compile", "true",
                   "--run_root", tmp_path, "--run_name", "gpu")
    assert code == 0
    assert (tmp_path / "gpu" / "last.ckpt").exists()
