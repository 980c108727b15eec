"""The one initialiser of the package: new units, heads, columns and adapters are drawn the way
``nn.Linear`` draws its parameters, ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, from an explicit generator,
so every process with the same seed draws the same values (the ranks of a DDP job take the same surgery).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn


def uniform_init(
    rows: int, fan_in: int, generator: torch.Generator, like: Tensor, bias: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Weights (then biases, unless ``bias=False``) for ``rows`` units reading ``fan_in`` inputs, with the
    device and dtype of ``like``.

    Example:
        >>> w, b = uniform_init(3, 4, torch.Generator().manual_seed(0), torch.zeros(1))
        >>> tuple(w.shape), tuple(b.shape)
        ((3, 4), (3,))
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    weight = torch.empty(rows, fan_in).uniform_(-bound, bound, generator=generator)
    drawn = torch.empty(rows).uniform_(-bound, bound, generator=generator) if bias else None
    return weight.to(like), None if drawn is None else drawn.to(like)


@torch.no_grad()
def draw_layer_(layer: nn.Module, generator: torch.Generator) -> None:
    """Redraw an ``nn.Linear`` or ``nn.Conv2d`` layer's ``weight`` (then ``bias``, if it has one) in place with
    :func:`uniform_init`, a unit's fan-in being its whole row (or filter).

    Example:
        >>> layer = nn.Linear(4, 2)
        >>> draw_layer_(layer, torch.Generator().manual_seed(0))
        >>> bool(layer.weight.abs().max() <= 0.5)
        True
    """
    rows = layer.weight.shape[0]
    weight, bias = uniform_init(rows, layer.weight[0].numel(), generator, layer.weight, bias=layer.bias is not None)
    layer.weight.copy_(weight.view_as(layer.weight))
    if bias is not None:
        layer.bias.copy_(bias)


def conv_settings(conv: nn.Conv2d) -> dict[str, Any]:
    """``conv``'s kernel size, stride, padding and dilation, as keyword arguments of ``nn.Conv2d``.

    Example:
        >>> conv_settings(nn.Conv2d(1, 4, 3, padding=1))
        {'kernel_size': (3, 3), 'stride': (1, 1), 'padding': (1, 1), 'dilation': (1, 1)}
    """
    return {name: getattr(conv, name) for name in ("kernel_size", "stride", "padding", "dilation")}


def fresh_layer(like: nn.Linear | nn.Conv2d, device: torch.device | str | None = None) -> nn.Linear | nn.Conv2d:
    """A freshly drawn ``nn.Linear`` or ``nn.Conv2d`` of ``like``'s shape and settings (torch's own initialisation,
    from the global RNG), on ``device``; the meta device keeps the shape and settings alone and draws nothing.

    Example:
        >>> fresh_layer(nn.Conv2d(1, 4, 3, padding=1))
        Conv2d(1, 4, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
        >>> fresh_layer(nn.Linear(3, 2), device="meta").weight.is_meta
        True
    """
    if isinstance(like, nn.Conv2d):
        bias = like.bias is not None
        return nn.Conv2d(like.in_channels, like.out_channels, **conv_settings(like), bias=bias, device=device)
    return nn.Linear(like.in_features, like.out_features, bias=like.bias is not None, device=device)
