"""Freezing single entries of a Parameter so that they stay bit-identical through any optimizer.

A gradient mask alone does not freeze: Adam's moments, weight decay or momentum built earlier still
move masked entries (the LLDEN port was bitten by this). :class:`FrozenEntries` therefore does both:
it zeroes the gradients of frozen entries before the step (clean optimizer state) and writes their
values back after it (exactness). Whole Parameters are frozen with ``requires_grad_(False)`` instead.

Both run on every step, so a frozen set that is a leading block (the first ``r`` rows and ``c``
columns) is kept as that block, zeroed and copied back in one pass each; any other mask is applied
densely. (DEN's expansion, whose frozen entries are such a block, gives its trained entries
Parameters of their own instead: :meth:`~lightning_den.core.den.layers.ExpandableLinear.train_outside_`.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def frozen_leading_block(trained: Tensor) -> tuple[slice, ...] | None:
    """The slices of the frozen entries (``trained`` False) when they are exactly a leading block.

    Example:
        >>> trained = torch.ones(3, 4, dtype=torch.bool)
        >>> trained[:2, :3] = False
        >>> frozen_leading_block(trained)
        (slice(None, 2, None), slice(None, 3, None))
        >>> frozen_leading_block(torch.tensor([True, False]))  # frozen entry not at the start
    """
    frozen = ~trained.bool()
    # per dimension, how many of its indices hold a frozen entry (reduced where the mask lies: no copy of it)
    dims = range(frozen.ndim)
    others = [tuple(o for o in dims if o != d) for d in dims]
    extents = [int((frozen.any(dim=rest) if rest else frozen).sum()) for rest in others]
    block = tuple(slice(extent) for extent in extents)
    if not frozen.any() or int(frozen.sum()) != frozen[block].numel() or not bool(frozen[block].all()):
        return None
    return block


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
        self.params: list[nn.Parameter] = []  # masked densely
        self.masks: list[Tensor] = []
        self.kept: list[Tensor] = []
        self.blocks: list[tuple[nn.Parameter, tuple[slice, ...], Tensor]] = []  # frozen leading blocks
        with torch.no_grad():
            for p, trained in masks.items():
                block = frozen_leading_block(trained)
                if block is not None:
                    self.blocks.append((p, block, p.detach()[block].clone()))
                    continue
                mask = trained.to(device=p.device, dtype=p.dtype)
                self.params.append(p)
                self.masks.append(mask)
                self.kept.append(p.detach() * (1 - mask))

    def __len__(self) -> int:
        return len(self.params) + len(self.blocks)

    @torch.no_grad()
    def mask_gradients_(self) -> None:
        """Zero the gradients of frozen entries (call after backward, before the optimizer step)."""
        pairs = [(p.grad, m) for p, m in zip(self.params, self.masks, strict=True) if p.grad is not None]
        if pairs:
            grads, masks = zip(*pairs, strict=True)
            torch._foreach_mul_(list(grads), list(masks))
        blocks = [p.grad[block] for p, block, _ in self.blocks if p.grad is not None]
        if blocks:
            torch._foreach_zero_(blocks)

    @torch.no_grad()
    def restore_(self) -> None:
        """Write the frozen entries back: ``p <- p * mask + kept`` (exact: ``x * 1 + 0 == x``), or copy
        a frozen block back."""
        if self.params:
            torch._foreach_mul_(self.params, self.masks)
            torch._foreach_add_(self.params, self.kept)
        if self.blocks:
            torch._foreach_copy_([p.detach()[block] for p, block, _ in self.blocks], [kept for *_, kept in self.blocks])
