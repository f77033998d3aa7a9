"""Per-sample gradients of LoRA adapters from plain forward and gradient hooks.

An adapter computes ``y = B(A(x))``. For sample ``n``, with ``h = A(x)`` and ``g = dL/dy``,
``dL/dB_n = g_n^T h_n`` and ``dL/dA_n = (g_n B)^T x_n`` (summed over the sample's tokens): what
opacus' ``nn.Linear`` grad sampler computes, from a forward and a full backward hook on each of
``A`` and ``B``. Hand-written because opacus' hooks cost more than the sums they compute on
small matrices (full backward hooks wrap every call in autograd functions, and each hook walks
its module's parameters): on SmolLM2's structure, 420 LoRA matrices, they added 2.6× what these
add to a backward pass (``make bench``, the ``smollm2-shape`` row), the part of a DP step a GPU
cannot hide. Here ``A``'s forward hook keeps ``x``; ``B``'s hangs a hook on the gradient of
``y`` (``B``'s per-sample gradients from ``g`` and ``h``) and one on the gradient of ``h``
(``A``'s, from ``g B`` and ``x``), each setting ``p.grad_sample``, where the privacy engine's
clipping reads them as it reads opacus'.

Only plain LoRA on linear layers (no bias, no DoRA or other variant) is covered; a model with
anything else trainable is left to opacus (:func:`covers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

_HOOKED = "_privtune_lora_grad_sample"  # set on a model while hooks are on it


def _adapters(model: nn.Module) -> Iterator[tuple[nn.Linear, nn.Linear]]:
    """(A, B) of every active plain LoRA adapter on a linear layer of ``model``."""
    for layer in model.modules():
        if not isinstance(layer, LoraLinear):
            continue
        for name in layer.active_adapters:
            if name not in layer.lora_A or name in layer.lora_variant:
                continue
            a, b = layer.lora_A[name], layer.lora_B[name]
            if type(a) is nn.Linear and type(b) is nn.Linear and a.bias is None and b.bias is None:
                yield a, b


def _trainable_adapters(
    model: nn.Module, parameters: Iterable[torch.Tensor]
) -> list[tuple[nn.Linear, nn.Linear]]:
    """The adapters of ``model`` whose A and B are both among ``parameters``."""
    ids = {id(p) for p in parameters}
    return [(a, b) for a, b in _adapters(model) if {id(a.weight), id(b.weight)} <= ids]


def covers(model: nn.Module, parameters: Iterable[torch.Tensor]) -> bool:
    """Whether every one of ``parameters`` (the trainable ones) is a matrix of a plain LoRA
    adapter of ``model`` whose other matrix is among them too, so that :class:`LoraGradSample`
    captures all of them (an adapter with one matrix frozen is left to opacus)."""
    parameters = list(parameters)
    hooked = {id(m.weight) for pair in _trainable_adapters(model, parameters) for m in pair}
    return bool(parameters) and all(id(p) in hooked for p in parameters)


class LoraGradSample:
    """Hooks on ``model``'s LoRA adapters whose matrices are among ``parameters`` that set
    ``p.grad_sample`` (N, *p.shape) on each backward pass of a batch of N samples (batch
    first, the loss a sum over samples)."""

    def __init__(self, model: nn.Module, parameters: Iterable[torch.Tensor]) -> None:
        if getattr(model, _HOOKED, False):  # each backward would capture twice (as opacus)
            raise ValueError(
                "per-sample gradient hooks are already on this model: finish the run that put "
                "them there (PrivacyEngine.finish) before another wraps it"
            )
        setattr(model, _HOOKED, True)
        self._model = model
        # A -> (x, h): its input and output, from A's call to B's
        self._inputs: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []
        for a, b in _trainable_adapters(model, parameters):
            self._handles.append(a.register_forward_hook(self._keep_input))
            self._handles.append(b.register_forward_hook(partial(self._on_output, a)))

    def remove(self) -> None:
        """Detach the hooks (the model then trains and evaluates as without them)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        if getattr(self._model, _HOOKED, False):
            delattr(self._model, _HOOKED)

    def _keep_input(self, a: nn.Module, inputs: tuple[torch.Tensor, ...], h: torch.Tensor) -> None:
        if a.training and torch.is_grad_enabled():  # as opacus: nothing kept for evaluation
            self._inputs[a] = (inputs[0].detach(), h)

    def _on_output(
        self, a: nn.Linear, b: nn.Linear, inputs: tuple[torch.Tensor, ...], y: torch.Tensor
    ) -> None:
        x, h_of_a = self._inputs.pop(a, (None, None))
        h = inputs[0]
        # A's input of this very call (not one an exception left behind): B takes A's output
        if x is not None and h is h_of_a and y.requires_grad and h.requires_grad:
            y.register_hook(partial(_per_sample, b.weight, h.detach()))  # dL/dy: B's
            h.register_hook(partial(_per_sample, a.weight, x))  # dL/dh: A's


def _per_sample(weight: torch.Tensor, activations: torch.Tensor, backprops: torch.Tensor) -> None:
    """A linear map's per-sample gradients, ``backprops_n^T activations_n`` summed over the
    sample's rows (tokens), into ``weight.grad_sample``; in the backprops' dtype, as opacus."""
    backprops = _rows_by_sample(backprops)  # (N, rows, out)
    activations = _rows_by_sample(activations.to(backprops.dtype))  # (N, rows, in)
    grad_sample = torch.bmm(backprops.transpose(1, 2), activations)  # (N, out, in)
    if getattr(weight, "grad_sample", None) is not None:  # a sum here would mix two samples
        raise RuntimeError(
            "a LoRA matrix's per-sample gradients were captured twice before the privacy "
            "engine clipped them (an adapter called twice in one forward pass, or two "
            "backward passes per micro-batch): use opacus' hooks (finetune.grad_sampler: "
            "opacus) for such a model"
        )
    weight.grad_sample = grad_sample


def _rows_by_sample(t: torch.Tensor) -> torch.Tensor:
    """(N, ..., features) as (N, rows, features): a sample's tokens are its rows."""
    return t.reshape(t.shape[0], -1, t.shape[-1])
