"""Networks (IDQL_SPEC Sec. 1, 3; paper App. G): MLP, fused twin-Q ensemble, Fourier time embedding,
LN-ResNet and plain-MLP score networks, and the fused EMA/Polyak update.

Initialization follows the reference code's flax defaults: xavier-uniform for the MLPs and the first/last
Dense of the score network, LeCun-normal for the residual blocks' inner Dense layers, zero biases, LayerNorm
epsilon 1e-6.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from idql_pl.errors import ConfigError

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_cpu_allocator(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep freed CPU tensor memory in the process (glibc only; the CLI and the benchmark call it at start,
    opt out with ``IDQL_TUNE_MALLOC=0``; importing the library changes nothing).

    glibc serves large blocks with ``mmap`` and trims the heap when its free top exceeds a threshold, so the
    same few-MB activations are handed back to the OS after every call and page-faulted in again on the next
    one (PyTorch's CPU allocator does not cache). The extraction sampler (10 states x N=128: 5 MB
    activations) took ~73k minor page faults per call, 1.7x its fault-free time. Here blocks up to
    ``mmap_threshold`` come from the heap and up to ``trim_threshold`` of free heap is kept; the peak RSS is
    unchanged, memory is just not returned between calls. Returns whether the setting was applied.
    """
    if os.environ.get("IDQL_TUNE_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False


def _tanh_softplus_(s: Tensor) -> tuple[Tensor, Tensor]:
    """From ``s = sigmoid(x)`` (overwritten): ``(t, spare)`` with ``t = tanh(softplus(x)) = n / (2 - n)``,
    ``n = s (2 - s)`` (the same function as ``s (2 - s) / (1 + (1 - s)^2)``), in 3 elementwise passes and one
    allocation; ``spare`` is a free tensor of ``x``'s shape to write the output into."""
    n = s.lerp_(s.new_ones(()), s)  # s + s (1 - s) = s (2 - s), in place
    spare = torch.rsub(n, 2.0)
    return n.div_(spare), spare


class _MishFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        xs = torch.mul(x, s)
        t, spare = _tanh_softplus_(s)
        ctx.save_for_backward(xs, t)  # x sigmoid(x) and t: 2 tensors, not 3
        return torch.mul(x, t, out=spare)  # 6 passes, 3 allocations (all kept)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        xs, t = ctx.saved_tensors
        # d/dx [x tanh(softplus(x))] = t + x sigmoid(x) (1 - t^2): 4 passes, 1 allocation
        out = torch.mul(t, t)
        return torch.addcmul(xs, xs, out, value=-1.0, out=out).add_(t).mul_(grad)


# ------------------------------------------------------------------------------- oneDNN linear
# Products below ~4M multiply-adds stay on PyTorch's default BLAS: there oneDNN's per-call cost (~10 us) exceeds
# its gain (measured on this project's benchmark CPU: 256x256x256 takes 85 us in oneDNN vs 165 us in MKL, while
# 256x23x256 is even and 256x256x1 takes 14 vs 5 us).
ONEDNN_MIN_MACS = 1 << 22
_ONEDNN_OK: bool | None = None


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _probe_onednn() -> bool:
    """oneDNN's fp32 inner product (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor uses) exists,
    runs, and matches float64 references in every calling pattern :class:`_OneDNNLinear` uses."""
    if os.environ.get("IDQL_ONEDNN", "1") == "0":
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(24, 40, generator=g), torch.randn(32, 40, generator=g), torch.randn(32, generator=g)
        r, gy = torch.randn(24, 32, generator=g), torch.randn(24, 32, generator=g)
        with torch.no_grad():
            cases = [
                (op(x, w, b, "none", [], ""), x.double() @ w.double().t() + b.double()),
                (op.binary(x, r, w, b, "add"), x.double() @ w.double().t() + b.double() + r.double()),
                (op(gy, w.t(), None, "none", [], ""), gy.double() @ w.double()),  # grad wrt the input
                (op(gy.t(), x.t(), None, "none", [], ""), gy.double().t() @ x.double()),  # grad wrt the weight
                (op(x.t(), gy.t(), None, "none", [], ""), x.double().t() @ gy.double()),  # ... its transpose
            ]
        return all(got.shape == ref.shape and torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4) for got, ref in cases)
    except Exception:  # op missing or failing in this build: keep PyTorch's default GEMMs
        return False


def onednn_linear_available() -> bool:
    """Whether CPU float32 :func:`linear` calls may use oneDNN (probed once; ``IDQL_ONEDNN=0`` turns it off)."""
    global _ONEDNN_OK
    if _ONEDNN_OK is None:
        _ONEDNN_OK = _probe_onednn()
    return _ONEDNN_OK


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _use_onednn(x: Tensor, weight: Tensor, macs: int | None = None) -> bool:
    """Whether ``x @ weight.T`` (``macs`` multiply-adds; by default ``x.numel() * out``) runs in oneDNN."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and min(weight.shape) >= 8
        and (x.numel() * weight.shape[0] if macs is None else macs) >= ONEDNN_MIN_MACS
        and not _autocast_cpu()
        and not _compiling()  # under torch.compile, F.linear: inductor picks its own GEMM kernels
        and onednn_linear_available()
    )


def _onednn_weight_grad(g2: Tensor, x2: Tensor) -> Tensor:
    """``g2^T @ x2`` (the weight gradient of ``x2 @ W^T``) in oneDNN. It copies a transposed left operand to
    contiguous memory, so the smaller of the two products is transposed."""
    op = torch.ops.mkldnn._linear_pointwise
    if g2.shape[1] > x2.shape[1]:  # x^T [in, B] copied, then the [in, out] result transposed back
        return op(x2.t(), g2.t(), None, "none", [], "").t().contiguous()
    return op(g2.t(), x2.t(), None, "none", [], "")  # g^T [out, B] copied


class _OneDNNLinear(torch.autograd.Function):
    """``x @ W.T + b (+ residual)`` with the forward and both backward GEMMs in oneDNN."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor:
        op = torch.ops.mkldnn._linear_pointwise
        x2 = x.reshape(-1, x.shape[-1])
        if residual is None:
            y = op(x2, weight, bias, "none", [], "")
        else:
            y = op.binary(x2, residual.reshape(-1, weight.shape[0]), weight, bias, "add")
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        op = torch.ops.mkldnn._linear_pointwise
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        needs = ctx.needs_input_grad
        grad_x = op(g2, weight.t(), None, "none", [], "").view(ctx.x_shape) if needs[0] else None
        grad_w = _onednn_weight_grad(g2, x2) if needs[1] else None
        grad_b = g2.sum(0) if ctx.has_bias and needs[2] else None
        return grad_x, grad_w, grad_b, grad if needs[3] else None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias) (+ residual)``. CPU float32 GEMMs of >= ``ONEDNN_MIN_MACS`` multiply-adds
    run in oneDNN (forward and backward; the residual add fused into the forward GEMM): PyTorch's default CPU
    BLAS (MKL) takes an AVX2 path on AMD CPUs and reaches about half of the AVX-512 peak that oneDNN reaches
    (2x on this project's benchmark machine). Same function up to float rounding; elsewhere ``F.linear``."""
    if _use_onednn(x, weight):
        return _OneDNNLinear.apply(x, weight, bias, residual)
    y = F.linear(x, weight, bias)
    return y if residual is None else residual + y


def _product(x: Tensor, weight: Tensor, bias: Tensor | None = None, relu: bool = False) -> Tensor:
    """``x @ weight.T (+ bias) (relu)`` for 2-D operands: oneDNN (ReLU fused) from ``ONEDNN_MIN_MACS``
    multiply-adds, PyTorch's BLAS below, where oneDNN's per-call cost (~10 us) exceeds the product."""
    if x.shape[0] * x.shape[1] * weight.shape[0] >= ONEDNN_MIN_MACS:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    return y.relu_() if relu else y


def _weight_grad(g2: Tensor, x2: Tensor) -> Tensor:
    """``g2^T @ x2``: oneDNN from ``ONEDNN_MIN_MACS`` multiply-adds, PyTorch's BLAS below."""
    if g2.shape[0] * g2.shape[1] * x2.shape[1] >= ONEDNN_MIN_MACS:
        return _onednn_weight_grad(g2, x2)
    return torch.mm(g2.t(), x2)


class _OneDNNReLUMLP(torch.autograd.Function):
    """An ensemble of ReLU MLPs (``Dense -> relu -> ... -> Dense``) as one autograd node: each member's
    products in oneDNN (:func:`_product`) with the ReLU fused into the GEMM, the backward written out layer
    by layer. ``x``: ``[E, B, in]``, or ``[B, in]`` shared by every member; ``params``: ``W_0, b_0, W_1, b_1,
    ...`` with ``W_i [E, out, in]``, ``b_i [E, 1, out]``. Returns ``[E, B, out]``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, *params: Tensor) -> Tensor:
        weights, biases = params[0::2], params[1::2]
        shared, last = x.dim() == 2, len(weights) - 1
        inputs: list[list[Tensor]] = []  # per layer, per member: the layer's input (a ReLU output after layer 0)
        h = [x if shared else x[e] for e in range(weights[0].shape[0])]
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            inputs.append(h)
            h = [_product(h_e, w[e], b[e, 0], relu=i < last) for e, h_e in enumerate(h)]
        ctx.save_for_backward(x, *weights, *(t for layer in inputs[1:] for t in layer))
        ctx.shared, ctx.num_layers = shared, len(weights)
        return torch.stack(h)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved, n, members = ctx.saved_tensors, ctx.num_layers, range(grad.shape[0])
        x, weights, hidden = saved[0], saved[1:n + 1], saved[n + 1:]
        inputs = [[x if ctx.shared else x[e] for e in members]]
        inputs += [list(hidden[i * len(members):(i + 1) * len(members)]) for i in range(n - 1)]
        needs = ctx.needs_input_grad
        grads: list[Tensor | None] = [None] * (2 * n)
        g = [grad[e] for e in members]
        for i in reversed(range(n)):
            if needs[1 + 2 * i]:
                grads[2 * i] = _stack_like(weights[i], [_weight_grad(g[e], inputs[i][e]) for e in members])
            if needs[2 + 2 * i]:
                grads[2 * i + 1] = torch.stack([g_e.sum(0, keepdim=True) for g_e in g])
            if i == 0:
                break
            # through layer i's product, then the ReLU whose output was layer i's input
            g = [torch.ops.aten.threshold_backward(_product(g[e], weights[i][e].t()), inputs[i][e], 0.0)
                 for e in members]
        grad_x = None
        if needs[0]:
            per_member = [_product(g[e], weights[0][e].t()) for e in members]
            grad_x = torch.stack(per_member).sum(0) if ctx.shared else torch.stack(per_member)
        return grad_x, *grads


def _stack_like(param: Tensor, parts: Sequence[Tensor]) -> Tensor:
    """``torch.stack(parts)`` in ``param``'s memory layout (a gradient DDP can bucket without a warning)."""
    out = torch.empty_like(param)
    for e, part in enumerate(parts):
        out[e].copy_(part)
    return out


def _fused_relu_mlp_applies(x: Tensor, weights: Sequence[Tensor]) -> bool:
    """Whether :class:`_OneDNNReLUMLP` takes ``x`` (2-D shared or 3-D per member) through ``weights``: its
    widest layer has >= ``ONEDNN_MIN_MACS`` multiply-adds per member and :func:`linear`'s conditions hold."""
    if _compiling() or x.dim() not in (2, 3) or x.shape[-1] != weights[0].shape[-1]:
        return False
    widest = max(weights, key=lambda w: w.shape[-2] * w.shape[-1])[0]
    return _use_onednn(x, widest, macs=x.shape[-2] * widest.numel())


def _flat(weights: Sequence[Tensor], biases: Sequence[Tensor]) -> list[Tensor]:
    return [t for pair in zip(weights, biases, strict=True) for t in pair]


def ensemble_mlp(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor], activation: nn.Module) -> Tensor:
    """``E`` independent MLPs as one op per layer: ``x [E, B, in]`` (or ``[B, in]``, shared), ``weights[i]
    [E, out, in]``, ``biases[i] [E, 1, out]`` -> ``[E, B, out]``; ``activation`` between layers, none after the
    last. ReLU MLPs on CPU float32 with a layer of >= ``ONEDNN_MIN_MACS`` multiply-adds run as one
    :class:`_OneDNNReLUMLP` node; elsewhere one ``torch.baddbmm`` per layer over all members."""
    if isinstance(activation, nn.ReLU) and _fused_relu_mlp_applies(x, weights):
        return _OneDNNReLUMLP.apply(x, *_flat(weights, biases))
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(weights[0].shape[0], *x.shape)
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        x = torch.baddbmm(b, x, w.transpose(1, 2))
        if i < len(weights) - 1:
            x = activation(x)
    return x


class Dense(nn.Linear):
    """``nn.Linear`` (same parameters, init and state_dict) computed with :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class Mish(nn.Module):
    """``mish(x) = x tanh(softplus(x))`` (the paper-era activation, App. G). On CPU it is computed through the
    vectorized sigmoid (identity above), ~4x faster forward+backward than ``torch.nn.Mish``'s CPU kernel and
    equal to it within float rounding; on other devices it is ``F.mish`` (a fused kernel there)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":  # a fused kernel there
            return F.mish(x)
        if _compiling():  # inductor fuses these into one pass; its CPU code for F.mish is ~8x slower
            s = torch.sigmoid(x)
            n = s * (2 - s)
            return x * n / (2 - n)
        if torch.is_grad_enabled() and x.requires_grad:
            return _MishFunction.apply(x)
        t, spare = _tanh_softplus_(torch.sigmoid(x))
        return torch.mul(x, t, out=spare)  # 5 passes, 2 allocations


_RANDOM_LEVELS = 1 << 16  # dropout draws 16-bit uniforms


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training-mode mask comes from 16-bit uniforms, four per 64-bit draw of the
    global generator: the draw costs 1/6 of ``bernoulli_``'s, which takes one Mersenne-Twister number per
    element (1.1 ms for a 1024 x 256 mask on the benchmark CPU), and the layer runs 3x faster than
    ``F.dropout`` (+8% actor steps/s). The drop probability is
    ``p`` rounded to a multiple of 2^-16 (0.1 -> 0.100006) and kept values are scaled by its exact
    ``1 / (1 - p)``, so the layer stays unbiased. Same parameters (none) and state_dict; elsewhere, in eval
    mode and under ``torch.compile``, it is ``F.dropout``."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and self.p > 0 and x.device.type == "cpu" and not _compiling()):
            return F.dropout(x, self.p, self.training, self.inplace)
        dropped = min(_RANDOM_LEVELS, round(self.p * _RANDOM_LEVELS))
        if dropped == _RANDOM_LEVELS:
            return x * 0.0
        n = x.numel()
        bits = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        uniform16 = bits.view(torch.int16)[:n].view(x.shape)  # uniform over [-2^15, 2^15)
        keep = uniform16 >= dropped - _RANDOM_LEVELS // 2  # P = 1 - dropped / 2^16
        return x * keep.to(x.dtype).mul_(_RANDOM_LEVELS / (_RANDOM_LEVELS - dropped))


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "mish": Mish,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
}


def make_activation(name: str) -> nn.Module:
    """Activation module by name (mish: paper-era code; swish: the later code)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}: use one of {', '.join(ACTIVATIONS)}") from None


def _xavier_(linear: nn.Linear) -> nn.Linear:
    nn.init.xavier_uniform_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


def _lecun_(linear: nn.Linear) -> nn.Linear:
    """flax's default Dense init: truncated normal with variance 1/fan_in (std corrected for truncation)."""
    std = math.sqrt(1.0 / linear.in_features) / 0.87962566103423978
    nn.init.trunc_normal_(linear.weight, std=std, a=-2 * std, b=2 * std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


@torch.no_grad()
def ema_update_(target_params: Iterable[Tensor], source_params: Iterable[Tensor], rate: float) -> None:
    """Polyak/EMA update ``target <- (1 - rate) target + rate source`` for all tensors in one fused
    ``torch._foreach_lerp_`` call (critic target: rate 0.005, IDQL_SPEC Sec. 1; behavior EMA: 0.001, Sec. 3)."""
    targets = target_params if isinstance(target_params, list) else list(target_params)
    sources = source_params if isinstance(source_params, list) else list(source_params)
    if len(targets) != len(sources):
        raise ValueError(f"ema_update_: {len(targets)} target tensors but {len(sources)} source tensors")
    if targets:
        torch._foreach_lerp_(targets, sources, rate)


def strip_dropout_(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Dropout`` inside ``module`` by ``nn.Identity`` (no parameters change, so the
    state_dict is unchanged): the module then computes its eval-mode function in either train/eval mode."""
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.dropout._DropoutNd):
                setattr(parent, name, nn.Identity())
    return module


class MLP(nn.Module):
    """``Dense -> act -> ... -> Dense(out_dim)``; xavier-uniform weights, zero biases (reference ``MLP``)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dims: Sequence[int],
        out_dim: int,
        activation: str = "relu",
        activate_final: bool = False,
    ):
        super().__init__()
        dims = [in_dim, *hidden_dims, out_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=False)):
            layers.append(_xavier_(Dense(d_in, d_out)))
            if i < len(dims) - 2 or activate_final:
                layers.append(make_activation(activation))
        self.net = nn.Sequential(*layers)
        self._relu_hidden = activation == "relu" and not activate_final

    def forward(self, x: Tensor) -> Tensor:
        if self._relu_hidden and x.device.type == "cpu":  # one fused node (a single-member ensemble_mlp)
            linears = self.net[::2]
            weights = [m.weight.unsqueeze(0) for m in linears]
            if _fused_relu_mlp_applies(x, weights):
                return _OneDNNReLUMLP.apply(x, *_flat(weights, [m.bias.view(1, 1, -1) for m in linears]))[0]
        return self.net(x)


class EnsembleMLP(nn.Module):
    """``E`` independent MLPs evaluated together (:func:`ensemble_mlp`; stacked weights
    ``[E, out, in]`` as ``nn.Linear`` stores them; no Python loop over members on the default path).
    ``forward(x [B, in]) -> [E, B, out]``; an input of shape ``[E, B, in]`` gives each member its own rows."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, num_members: int = 2,
                 activation: str = "relu"):
        super().__init__()
        self.num_members = num_members
        dims = [in_dim, *hidden_dims, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=False):
            # [E, out, in], with the strides of bmm's weight gradient (they differ only when out == 1), so the
            # gradients match DDP's bucket layout
            w = torch.empty(num_members, d_in, d_out).transpose(1, 2).contiguous()
            bound = math.sqrt(6.0 / (d_in + d_out))  # xavier-uniform per member
            nn.init.uniform_(w, -bound, bound)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(num_members, d_out)))
        self.act = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        # biases [E, out] viewed as [E, 1, out]: their gradients keep the parameters' layout (DDP buckets)
        return ensemble_mlp(x, list(self.weights), [b.unsqueeze(1) for b in self.biases], self.act)


class TwinQ(nn.Module):
    """The critic's Q ensemble (IDQL_SPEC Sec. 1: two independent ``MLP([s, a])``, 2x256 ReLU):
    ``forward(s [B, S], a [B, A]) -> [E, B]``, all members in one batched op."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims: Sequence[int] = (256, 256), num_members: int = 2,
                 activation: str = "relu"):
        super().__init__()
        self.ensemble = EnsembleMLP(obs_dim + action_dim, hidden_dims, 1, num_members, activation)

    def forward(self, states: Tensor, actions: Tensor) -> Tensor:
        return self.ensemble(torch.cat([states, actions], dim=-1)).squeeze(-1)


class FourierTimeEmbedding(nn.Module):
    """Learnable Fourier features of the step index (IDQL_SPEC Sec. 3; paper App. G): ``W ~ N(0, 0.2^2)``
    of shape ``[fourier_dim/2, 1]``, ``[cos(2 pi k W), sin(2 pi k W)]`` (``fourier_dim`` = 64), then the
    condition MLP ``Dense(time_dim) -> act -> Dense(time_dim)`` (128). ``k``: any shape, output ``[*k.shape, time_dim]``."""

    def __init__(self, fourier_dim: int = 64, time_dim: int = 128, activation: str = "mish"):
        super().__init__()
        if fourier_dim % 2:
            raise ConfigError(f"fourier_dim must be even (got {fourier_dim})")
        self.kernel = nn.Parameter(torch.randn(fourier_dim // 2, 1) * 0.2)
        self.mlp = MLP(fourier_dim, [time_dim], time_dim, activation=activation)

    def forward(self, k: Tensor) -> Tensor:
        f = (2 * math.pi) * k.to(self.kernel.dtype).unsqueeze(-1) * self.kernel.squeeze(-1)
        return self.mlp(torch.cat([torch.cos(f), torch.sin(f)], dim=-1))


class ScoreNet(nn.Module):
    """Noise predictor ``eps_hat(x, k, s)`` whose first Dense on ``concat[x, s, time_emb(k)]`` (paper App. G) is
    split into action/state/time column blocks, so callers can project each state once and reuse it across
    candidates and diffusion steps:

    ``forward(x, k, s) == forward_projected(x, k, project_state(s)) ==
    forward_parts(x, project_state(s), project_time(k))``.

    Leading dimensions broadcast: ``x [B, N, A]`` with ``state_proj [B, 1, H]`` and an int ``k`` evaluates
    N candidates per state. With ``num_timesteps`` set, integer ``k`` tensors read a ``[T, H]`` table of
    projected time embeddings (computed once per call) instead of embedding every row.
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int, time_dim: int = 128, fourier_dim: int = 64,
                 activation: str = "mish", num_timesteps: int | None = None):
        super().__init__()
        self.obs_dim, self.action_dim, self.hidden_dim = obs_dim, action_dim, hidden_dim
        self.num_timesteps = num_timesteps
        self.time_embedding = FourierTimeEmbedding(fourier_dim, time_dim, activation)
        # One xavier-initialized Dense over concat[x, s, t], stored as three column blocks.
        full = _xavier_(nn.Linear(action_dim + obs_dim + time_dim, hidden_dim))
        w_action, w_state, w_time = full.weight.detach().split([action_dim, obs_dim, time_dim], dim=1)
        self.in_action = Dense(action_dim, hidden_dim)
        self.in_state = Dense(obs_dim, hidden_dim, bias=False)
        self.in_time = Dense(time_dim, hidden_dim, bias=False)
        with torch.no_grad():
            self.in_action.weight.copy_(w_action)
            self.in_action.bias.zero_()
            self.in_state.weight.copy_(w_state)
            self.in_time.weight.copy_(w_time)

    def project_state(self, states: Tensor) -> Tensor:
        """The state block of the first Dense: ``[..., S] -> [..., H]`` (once per state)."""
        return self.in_state(states)

    def project_time(self, k: int | Tensor) -> Tensor:
        """The time block of the first Dense applied to ``time_emb(k)``: ``[*k.shape, H]`` (``[H]`` for an int)."""
        if isinstance(k, int):
            ref = self.in_time.weight
            return self.in_time(self.time_embedding(torch.tensor(float(k), device=ref.device, dtype=ref.dtype)))
        if self.num_timesteps is not None and not k.is_floating_point():
            table = self.time_table()
            return table.index_select(0, k.reshape(-1)).view(*k.shape, self.hidden_dim)
        return self.in_time(self.time_embedding(k))

    def time_table(self) -> Tensor:
        """``project_time(k)`` for every ``k in 0..num_timesteps-1``: ``[T, H]``."""
        ref = self.in_time.weight
        steps = torch.arange(self.num_timesteps, device=ref.device, dtype=ref.dtype)
        return self.in_time(self.time_embedding(steps))

    def forward_parts(self, x: Tensor, state_proj: Tensor, time_proj: Tensor) -> Tensor:
        return self.trunk(self.in_action(x) + state_proj + time_proj)

    def forward_projected(self, x: Tensor, k: int | Tensor, state_proj: Tensor) -> Tensor:
        return self.forward_parts(x, state_proj, self.project_time(k))

    def forward(self, x: Tensor, k: int | Tensor, states: Tensor) -> Tensor:
        return self.forward_projected(x, k, self.project_state(states))

    def trunk(self, h: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class ResidualBlock(nn.Module):
    """``x + Dense(H)(act(Dense(ff)(LayerNorm(Dropout(x)))))`` (paper App. G; reference ``MLPResNetV3Block``)."""

    def __init__(self, hidden_dim: int, ff_dim: int, dropout: float, activation: str):
        super().__init__()
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.fc1 = _lecun_(Dense(hidden_dim, ff_dim))
        self.act = make_activation(activation)
        self.fc2 = _lecun_(Dense(ff_dim, hidden_dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc1(self.norm(self.dropout(x))))
        return linear(h, self.fc2.weight, self.fc2.bias, residual=x)  # x + fc2(h), the add fused on CPU


class LNResNet(ScoreNet):
    """The paper's "LN_Resnet" score network (App. G): ``Dense(H)`` on ``concat[x, s, time_emb]`` ->
    ``num_blocks`` residual blocks -> act -> ``Dense(action_dim)``. Defaults: H 256, ff 1024, 3 blocks,
    dropout 0.1, mish."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int = 256, num_blocks: int = 3,
                 ff_dim: int = 1024, dropout: float = 0.1, activation: str = "mish", time_dim: int = 128,
                 fourier_dim: int = 64, num_timesteps: int | None = None):
        super().__init__(obs_dim, action_dim, hidden_dim, time_dim, fourier_dim, activation, num_timesteps)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden_dim, ff_dim, dropout, activation) for _ in range(num_blocks)))
        self.out_act = make_activation(activation)
        self.out = _xavier_(Dense(hidden_dim, action_dim))

    def trunk(self, h: Tensor) -> Tensor:
        return self.out(self.out_act(self.blocks(h)))


class MLPScoreNet(ScoreNet):
    """Plain-MLP score network (the paper's Fig. 3 baseline): ``Dense(H)`` on ``concat[x, s, time_emb]`` -> act,
    ``num_layers - 1`` more ``Dense(H) -> act``, then ``Dense(action_dim)``; no LayerNorm, no dropout."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dim: int = 256, num_layers: int = 3,
                 activation: str = "mish", time_dim: int = 128, fourier_dim: int = 64,
                 num_timesteps: int | None = None):
        super().__init__(obs_dim, action_dim, hidden_dim, time_dim, fourier_dim, activation, num_timesteps)
        self.act = make_activation(activation)
        self.rest = MLP(hidden_dim, [hidden_dim] * (num_layers - 1), action_dim, activation=activation)

    def trunk(self, h: Tensor) -> Tensor:
        return self.rest(self.act(h))


__all__ = [
    "ACTIVATIONS",
    "MLP",
    "Dense",
    "Dropout",
    "EnsembleMLP",
    "FourierTimeEmbedding",
    "LNResNet",
    "Mish",
    "MLPScoreNet",
    "ResidualBlock",
    "ScoreNet",
    "TwinQ",
    "ema_update_",
    "ensemble_mlp",
    "linear",
    "make_activation",
    "onednn_linear_available",
    "strip_dropout_",
    "tune_cpu_allocator",
]
