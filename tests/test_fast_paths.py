"""The CPU fast paths in ``idql_pl.nets`` compute the same functions as PyTorch's defaults (up to float
rounding): oneDNN ``linear`` (forward, backward, fused residual), and their fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from idql_pl import nets
from idql_pl.nets import Dense, LNResNet, linear, onednn_linear_available


@pytest.fixture
def onednn(monkeypatch: pytest.MonkeyPatch):
    """Run a test with the oneDNN path forced on (skipped where this torch build lacks it)."""
    if not onednn_linear_available():
        pytest.skip("oneDNN linear is not available in this torch build")
    return monkeypatch


def _grads(fn, *tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    for t in tensors:
        t.grad = None
    out = fn()
    out.square().sum().backward()
    return out.detach(), [t.grad.clone() for t in tensors]


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 2e-5) -> bool:
    return bool((a - b).abs().max() <= rtol * b.abs().max() + 1e-6)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(512, 256), (4, 128, 256)])
def test_onednn_linear_matches_f_linear(onednn, residual: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    w = (torch.randn(1024, 256) * 0.05).requires_grad_(True)
    b = torch.randn(1024, requires_grad=True)
    r = torch.randn(*shape[:-1], 1024, requires_grad=True) if residual else None
    leaves = [x, w, b] + ([r] if residual else [])
    assert nets._use_onednn(x, w), "this size must take the oneDNN path"
    fast, fast_g = _grads(lambda: linear(x, w, b, residual=r), *leaves)
    ref, ref_g = _grads(lambda: F.linear(x, w, b) + (r if residual else 0), *leaves)
    assert fast.shape == ref.shape
    assert _close(fast, ref)
    for g_fast, g_ref in zip(fast_g, ref_g):
        assert _close(g_fast, g_ref)


def test_onednn_linear_skips_unneeded_grads(onednn) -> None:
    x = torch.randn(512, 256)  # data: no grad
    w = (torch.randn(1024, 256) * 0.05).requires_grad_(True)
    y = linear(x, w, None)
    y.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape
    assert _close(y, x @ w.detach().t())


def test_small_or_other_dtypes_use_f_linear(onednn) -> None:
    w = torch.randn(64, 32)
    assert not nets._use_onednn(torch.randn(16, 32), w)  # too small to pay
    big_w = torch.randn(1024, 256)
    assert not nets._use_onednn(torch.randn(512, 256).double(), big_w.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(512, 256)
        assert not nets._use_onednn(x, big_w)
        assert linear(x, big_w).dtype == torch.bfloat16  # autocast still applies


def test_onednn_sees_in_place_weight_updates(onednn) -> None:
    """The optimizer updates weights in place (same data pointer): no stale cached weight may be reused."""
    torch.manual_seed(0)
    x, w, b = torch.randn(512, 256), torch.randn(1024, 256) * 0.05, torch.randn(1024)
    for _ in range(3):
        assert _close(linear(x, w, b), F.linear(x, w, b))
        w.add_(0.5)
        b.mul_(2.0)


def test_torch_compile_gets_f_linear(onednn) -> None:
    """Inside torch.compile the oneDNN op is left to inductor (it cannot lower it from our Function)."""
    x, w = torch.randn(512, 256), torch.randn(1024, 256)
    assert nets._use_onednn(x, w)
    onednn.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not nets._use_onednn(x, w)


def test_disabled_onednn_is_exactly_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nets, "_ONEDNN_OK", False)
    torch.manual_seed(0)
    x, w, b, r = torch.randn(512, 256), torch.randn(1024, 256), torch.randn(1024), torch.randn(512, 1024)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(linear(x, w, b, residual=r), r + F.linear(x, w, b))


def test_dense_is_a_linear_with_the_same_state_dict() -> None:
    torch.manual_seed(0)
    dense = Dense(8, 4)
    torch.manual_seed(0)
    plain = torch.nn.Linear(8, 4)
    assert isinstance(dense, torch.nn.Linear)
    assert dense.state_dict().keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(dense.state_dict()[k], v)  # same init RNG draws


def test_ln_resnet_onednn_equals_default_path(onednn) -> None:
    """Paper-size LN-ResNet (dropout off): outputs and every parameter gradient agree with the default path."""
    torch.manual_seed(0)
    net = LNResNet(4, 2, dropout=0.0, num_timesteps=5)
    x, s = torch.randn(1024, 2), torch.randn(1024, 4)
    k = torch.randint(5, (1024,))
    params = list(net.parameters())

    def run() -> torch.Tensor:
        return net(x, k, s)

    fast, fast_g = _grads(run, *params)
    onednn.setattr(nets, "_ONEDNN_OK", False)
    ref, ref_g = _grads(run, *params)
    assert _close(fast, ref, 1e-4)
    for g_fast, g_ref in zip(fast_g, ref_g):
        assert _close(g_fast, g_ref, 1e-4)


def test_allocator_tuning_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(nets.tune_cpu_allocator(), bool)
    monkeypatch.setenv("IDQL_TUNE_MALLOC", "0")
    assert nets.tune_cpu_allocator() is False


@pytest.mark.parametrize("per_member_input", [False, True])
def test_fused_relu_ensemble_equals_default_path(onednn, per_member_input: bool) -> None:
    """The one-node oneDNN twin-Q MLP (ReLU fused into the GEMMs, hand-written backward) matches the batched
    ``baddbmm`` path: output, the input gradient and every parameter gradient."""
    onednn.setattr(nets, "ONEDNN_MIN_MACS", 1)
    torch.manual_seed(0)
    ens = nets.EnsembleMLP(6, [64, 48], 1, num_members=2)  # a narrow first layer (pointmaze: obs 4 + action 2)
    x = torch.randn(2, 40, 6) if per_member_input else torch.randn(40, 6)
    x.requires_grad_(True)
    leaves = [x, *ens.parameters()]
    assert nets._fused_relu_mlp_applies(x, list(ens.weights))
    fast, fast_g = _grads(lambda: ens(x), *leaves)
    onednn.setattr(nets, "_ONEDNN_OK", False)
    ref, ref_g = _grads(lambda: ens(x), *leaves)
    assert fast.shape == ref.shape == (2, 40, 1)
    assert _close(fast, ref)
    for g_fast, g_ref in zip(fast_g, ref_g):
        assert g_fast.shape == g_ref.shape and _close(g_fast, g_ref)
    for p, g_fast, g_ref in zip(leaves[1:], fast_g[1:], ref_g[1:]):  # DDP buckets need the parameters' layout
        assert g_fast.stride() == g_ref.stride() == p.stride()


def test_fused_relu_mlp_equals_sequential(onednn) -> None:
    """A single ReLU ``MLP`` (the critic's V) takes the fused node and matches its own ``nn.Sequential``;
    without gradients (the target net) it computes the same values."""
    onednn.setattr(nets, "ONEDNN_MIN_MACS", 1)
    torch.manual_seed(0)
    mlp = nets.MLP(17, [64, 64], 1)
    x = torch.randn(30, 17)
    params = list(mlp.parameters())
    assert nets._fused_relu_mlp_applies(x, [m.weight.unsqueeze(0) for m in mlp.net[::2]])
    fast, fast_g = _grads(lambda: mlp(x), *params)
    ref, ref_g = _grads(lambda: mlp.net(x), *params)
    assert _close(fast, ref)
    for g_fast, g_ref in zip(fast_g, ref_g):
        assert _close(g_fast, g_ref)
    with torch.no_grad():
        assert _close(mlp(x), ref)
    assert not nets.MLP(17, [64], 1, activation="mish")._relu_hidden  # other activations: nn.Sequential
