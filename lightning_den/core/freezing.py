"""Freezing single entries of a Parameter so that they stay bit-identical through any optimizer.

A gradient mask alone does not freeze: Adam's moments, weight decay or momentum built earlier still
move masked entries (the LLDEN port was bitten by this). :class:`FrozenEntries` therefore does both:
it zeroes the gradients of frozen entries before the step (clean optimizer state) and writes their
values back after it (exactness). Whole Parameters are frozen with ``requires_grad_(False)`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


class FrozenEntries:
    """Keeps the entries where ``masks[p]`` is False at their current values.

    Args:
        masks: for each partially trainable Parameter, a boolean tensor of its shape, True where the
            entry is trained.

    Example:
        >>> p = nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> frozen = FrozenEntries({p: torch.tensor([True, False])})
        >>> opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.5)
        >>> p.sum().backward(); frozen.mask_gradients_(); opt.step(); frozen.restore_()
        >>> p[1].item()
        2.0
    """

    def __init__(self, masks: Mapping[nn.Parameter, Tensor]) -> None:
        self.params = list(masks)
        with torch.no_grad():
            self.masks = [masks[p].to(device=p.device, dtype=p.dtype) for p in self.params]
            self.kept = [p.detach() * (1 - m) for p, m in zip(self.params, self.masks, strict=True)]

    def __len__(self) -> int:
        return len(self.params)

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Zero the gradients of frozen entries (call after backward, before the optimizer step)."""
        pairs = [(p.grad, m) for p, m in zip(self.params, self.masks, strict=True) if p.grad is not None]
        if pairs:
            grads, masks = zip(*pairs, strict=True)
            torch._foreach_mul_(list(grads), list(masks))

    @torch.no_grad()
    def restore_(self) -> None:
        """Write the frozen entries back: ``p <- p * mask + kept`` (exact: ``x * 1 + 0 == x``)."""
        if self.params:
            torch._foreach_mul_(self.params, self.masks)
            torch._foreach_add_(self.params, self.kept)
