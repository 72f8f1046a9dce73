"""A convolution double backward that computes only the gradients autograd asks for.

The R-op of :mod:`ccnn.hard.kkt` (``J·v``, Eq. 7 of Márquez-Neila, Salzmann and Fua, "Imposing
Hard Constraints on Deep Networks: Promises and Limitations", 2017) is the transpose of the
L-op: the vjp of ``u ↦ Jᵀu`` with respect to ``u``. Through a convolution that is the double
backward of the convolution, of which only one term is wanted, ``ggO = conv(ggI, W) +
conv(I, ggW) (+ ggb)``. PyTorch's ``aten::_convolution_double_backward`` (2.14) also computes the
other two, ``gW = conv(ggI, gO)`` and ``gI = convᵀ(gO, ggW)``, whenever ``ggI`` or ``ggW`` is
given, whatever its ``output_mask`` says, and autograd then drops them. For the first layer of
a network on images ``gI`` is the gradient with respect to the image, a transposed convolution
over the full resolution: on the pose network of Eq. 13 (16 images of 128×128, one thread) it
was 17 of the 44-50 ms of a product, and the two dropped terms together 22 ms.

:func:`lean_conv_double_backward` is a context manager under which that operator, on CPU and CUDA
tensors, returns only ``ggO`` when ``output_mask`` asks for ``ggO`` alone, by the same
operations in the same order as PyTorch's (so the numbers are the same to the bit), and defers to
PyTorch's own implementation in every other case. The kernel is registered on entry and removed
on exit; entries nest and may come from several threads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["lean_conv_double_backward"]

_OP = torch.ops.aten._convolution_double_backward.default
_KEYS = ("AutogradCPU", "AutogradCUDA")
_lock = threading.Lock()
_depth = 0
_library: torch.library.Library | None = None


def _grad_output_term(
    ggI: Tensor | None, ggW: Tensor | None, ggb: Tensor | None, gO: Tensor, weight: Tensor,
    inp: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
    transposed: bool, output_padding: Sequence[int], groups: int,
) -> Tensor:
    """``ggO = conv(ggI, W) + conv(I, ggW) + ggb``, as PyTorch computes it (same order)."""
    if not transposed and inp.dim() > 4:  # PyTorch infers the groups of a 3-D convolution
        groups = inp.shape[1] // weight.shape[1]
    ggO: Tensor | None = None
    if ggI is not None:
        w = weight.contiguous() if weight.is_cuda else weight
        ggO = torch.ops.aten.convolution(ggI, w, None, stride, padding, dilation, transposed,
                                         output_padding, groups)
    if ggW is not None:
        w = ggW.contiguous() if ggW.is_cuda else ggW
        term = torch.ops.aten.convolution(inp, w, None, stride, padding, dilation, transposed,
                                          output_padding, groups)
        ggO = term if ggO is None else ggO + term
    if ggb is not None:
        shape = [1] * gO.dim()
        shape[1] = ggb.shape[0]
        bias = ggb.contiguous().view(shape).expand(gO.shape)
        ggO = bias if ggO is None else ggO + bias
    assert ggO is not None  # the caller checked that ggI or ggW is given
    return ggO


def _double_backward(
    ggI: Tensor | None, ggW: Tensor | None, ggb: Tensor | None, gO: Tensor, weight: Tensor,
    inp: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
    transposed: bool, output_padding: Sequence[int], groups: int, output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """``aten::_convolution_double_backward`` that skips ``gI`` and ``gW`` when not asked for."""
    args = (ggI, ggW, ggb, gO, weight, inp, stride, padding, dilation, transposed,
            output_padding, groups, output_mask)
    lean = (tuple(output_mask) == (True, False, False) and inp.numel() != 0
            and (ggI is not None or ggW is not None)
            and (transposed or inp.dim() <= 4 or weight.shape[1] > 0))
    if not lean:
        return _OP.decompose(*args)
    unused = gO.new_empty(0)  # autograd discards the outputs output_mask does not ask for
    return _grad_output_term(*args[:-1]), unused, unused


@contextmanager
def lean_conv_double_backward() -> Iterator[None]:
    """Within this context, convolution double backwards compute only the requested terms.

    Meant around R-op products taken as transposed L-ops; results are unchanged (see the module
    docstring), only the unrequested work is skipped.
    """
    global _depth, _library
    with _lock:
        if _depth == 0:
            library = torch.library.Library("aten", "IMPL")
            for key in _KEYS:
                library.impl("_convolution_double_backward", _double_backward, key)
            _library = library
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _library is not None:
                _library._destroy()
                _library = None
