"""The lean convolution double backward: the same R-op products as PyTorch's, to the bit, and
against explicit Jacobians; fewer convolutions; PyTorch's own path for every other request;
registered only inside the context."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from ccnn.hard import double_backward, kkt, kkt_step
from ccnn.hard.double_backward import lean_conv_double_backward

OP = "aten::_convolution_double_backward"


def registered() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP, "AutogradCPU")


class CountConvolutions(TorchDispatchMode):
    """Counts the convolutions dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default, torch.ops.aten._convolution.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


# (function of (input, weight, bias), input shape, weight shape, bias size)
CASES: dict[str, tuple[Callable[..., Tensor], tuple, tuple, int | None]] = {
    "conv2d": (lambda x, w, b: F.conv2d(x, w, b, padding=1), (2, 3, 7, 6), (4, 3, 3, 3), 4),
    "conv2d-stride-dilation-groups": (
        lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=2, dilation=2, groups=2),
        (2, 4, 9, 8), (6, 2, 3, 3), 6),
    "conv1d-no-bias": (lambda x, w, b: F.conv1d(x, w, stride=3), (3, 2, 11), (5, 2, 4), None),
    "conv3d": (lambda x, w, b: F.conv3d(x, w, b, padding=1), (1, 2, 4, 5, 4), (3, 2, 3, 3, 3), 3),
    "conv-transpose2d": (
        lambda x, w, b: F.conv_transpose2d(x, w, b, stride=2, output_padding=1),
        (2, 3, 4, 5), (3, 2, 3, 3), 2),
}


def make_case(name: str, dtype: torch.dtype, input_grad: bool):
    """A two-layer function of ``params`` (a convolution, then a tanh and a squared sum per
    output channel) and its parameters; with ``input_grad`` the input is a parameter too."""
    fn, x_shape, w_shape, b_size = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    params = {"w": torch.randn(w_shape, generator=gen, dtype=dtype)}
    if b_size is not None:
        params["b"] = torch.randn(b_size, generator=gen, dtype=dtype)
    x = torch.randn(x_shape, generator=gen, dtype=dtype)
    if input_grad:
        params["x"] = x

    def f(p: dict[str, Tensor]) -> Tensor:
        y = fn(p.get("x", x), p["w"], p.get("b"))
        return torch.tanh(y).square().flatten(2).sum(2).reshape(-1)

    return f, params, gen


def transposed_rop(f, params, v):
    """``J·v`` as the vjp of ``u ↦ Jᵀu`` (the R-op of ccnn.hard.kkt)."""
    value, vjp_fn = torch.func.vjp(f, params)
    _, transposed = torch.func.vjp(vjp_fn, torch.zeros_like(value))
    (out,) = transposed((v,))
    return out


@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_rop_is_bitwise_pytorchs_and_matches_the_explicit_jacobian(name, input_grad):
    f, params, gen = make_case(name, torch.float64, input_grad)
    v = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype) for k, t in params.items()}
    plain = transposed_rop(f, params, v)
    with lean_conv_double_backward():
        lean = transposed_rop(f, params, v)
    assert torch.equal(lean, plain)
    jac = torch.func.jacrev(f)(params)
    dense = sum(jac[k].reshape(plain.numel(), -1) @ v[k].reshape(-1) for k in params)
    torch.testing.assert_close(lean, dense, rtol=1e-10, atol=1e-12)


def test_skips_the_unrequested_convolutions():
    f, params, gen = make_case("conv2d", torch.float32, input_grad=False)
    v = {k: torch.randn(t.shape, generator=gen) for k, t in params.items()}
    value, vjp_fn = torch.func.vjp(f, params)
    _, transposed = torch.func.vjp(vjp_fn, torch.zeros_like(value))
    with CountConvolutions() as plain:
        transposed((v,))
    with lean_conv_double_backward(), CountConvolutions() as lean:
        transposed((v,))
    # ggO = conv(I, ggW) is the one convolution needed (the input is a constant); PyTorch also
    # computes gI = convᵀ(gO, ggW)
    assert lean.count == 1
    assert plain.count == 2


def test_other_requests_take_pytorchs_path():
    """A gradient penalty: the double backward is asked for the weight's gradient (gW, and gI
    for the input), which the lean kernel leaves to PyTorch."""
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    w0 = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64)

    def penalty_grads() -> tuple[Tensor, Tensor]:
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = torch.tanh(F.conv2d(x, w, padding=1)).sum()
        (gx,) = torch.autograd.grad(out, x, create_graph=True)
        gw, gx2 = torch.autograd.grad(gx.square().sum(), (w, x))
        return gw, gx2

    plain = penalty_grads()
    with lean_conv_double_backward():
        lean = penalty_grads()
    for a, b in zip(lean, plain, strict=True):
        assert torch.equal(a, b)


def test_registered_only_inside_and_nests_across_threads():
    assert not registered()
    with lean_conv_double_backward():
        assert registered()
        with lean_conv_double_backward():
            assert registered()
        assert registered()
    assert not registered()
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def enter() -> None:
        try:
            barrier.wait()
            with lean_conv_double_backward():
                barrier.wait()
        except BaseException as err:  # reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=enter) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert not registered()
    with pytest.raises(RuntimeError), lean_conv_double_backward():
        raise RuntimeError("an error inside")
    assert not registered()


def test_kkt_step_through_convolutions_is_unchanged(monkeypatch):
    """The KKT step of Eq. 5 on a small convolutional network: the same increment and
    multipliers to the bit with and without the lean kernel."""
    gen = torch.Generator().manual_seed(5)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.MaxPool2d(2),
                              torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1),
                              torch.nn.Flatten(), torch.nn.Linear(64, 6))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    x = torch.randn(8, 3, 8, 8, generator=gen)
    xc = torch.randn(5, 3, 8, 8, generator=gen)
    params = {k: p.detach() for k, p in net.named_parameters()}

    def call(p, inputs):
        return torch.func.functional_call(net, p, (inputs,))

    def step():
        return kkt_step(params, lambda p: call(p, x).square().mean(),
                        lambda p: call(p, xc)[:, :3].sum(1) - call(p, xc)[:, 3:].sum(1),
                        eta=0.5, system="reduced", rtol=1e-6, maxit=30)

    calls = []

    def counted(*args):
        calls.append(args[-1])
        return kernel(*args)

    kernel = double_backward._double_backward
    monkeypatch.setattr(double_backward, "_double_backward", counted)
    lean = step()
    assert calls and all(tuple(mask) == (True, False, False) for mask in calls)
    monkeypatch.setattr(kkt, "lean_conv_double_backward", contextlib.nullcontext)
    plain = step()
    assert lean.info.iterations == plain.info.iterations
    assert torch.equal(lean.multipliers, plain.multipliers)
    for k in params:
        assert torch.equal(lean.delta[k], plain.delta[k])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rop_on_cuda_is_pytorchs():
    f, params, gen = make_case("conv2d-stride-dilation-groups", torch.float32, input_grad=True)
    v = {k: torch.randn(t.shape, generator=gen).cuda() for k, t in params.items()}
    params = {k: t.cuda() for k, t in params.items()}
    plain = transposed_rop(f, params, v)
    with lean_conv_double_backward():
        assert torch._C._dispatch_has_kernel_for_dispatch_key(OP, "AutogradCUDA")
        lean = transposed_rop(f, params, v)
    torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-6)
