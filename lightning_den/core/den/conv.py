"""Convolutional DEN: filters as units (Yoon et al., 2018, §4, the LeNet experiments).

:class:`ExpandableConv2d` is an :class:`~lightning_den.core.den.layers.ExpandableLinear` whose units are
filters: they carry a birth task, are only appended, and the filters alive for a task are a prefix of the
output channels. Every unit-level operation of DEN (selection, expansion, pruning, split, freezing, group
lasso over a filter) goes through the layer's view ``[filters, input channels, kernel positions]``, so the
same code grows a fully connected and a convolutional network. :class:`ExpandableCNN` stacks convolutions
and fully connected layers into a block ``DENMethod`` trains.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_den.core.checks import check_count, check_sizes
from lightning_den.core.den.layers import ExpandableLinear, ExpandableMLP
from lightning_den.core.init import uniform_init


class ExpandableConv2d(ExpandableLinear):
    """A 2-D convolution whose filters are units: filters are appended (and the newest removed) as
    :class:`ExpandableLinear`'s units are, so the filters alive for task ``s`` are a prefix of the output
    channels and timestamped inference is the slice ``W[:out(s), :in(s)]`` of the filter bank.

    The units below are the input channels: a filter reads a unit through its kernel slice
    ``weight[:, channel]``, so every unit-level operation (:meth:`by_input_unit`) sees the weight as
    ``[filters, input channels, kernel positions]``.

    Args:
        in_channels: channels of the input.
        out_channels: filters at construction.
        kernel_size: side of the square kernel.
        stride: stride of the convolution.
        padding: zero padding on each side.
        birth_task: task index recorded for the initial filters.

    Example:
        >>> conv = ExpandableConv2d(1, 4, kernel_size=3, padding=1)
        >>> conv(torch.ones(2, 1, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
        >>> conv(torch.ones(2, 1, 8, 8), out_width=3).shape   # the filters of an earlier task
        torch.Size([2, 3, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        birth_task: int = 0,
    ) -> None:
        nn.Module.__init__(self)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.input_group = 1
        reference = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self._hold(reference, birth_task)

    def forward(self, x: Tensor, out_width: int | None = None) -> Tensor:
        """The convolution with the first ``out_width`` filters over the channels ``x`` carries."""
        weight, bias = self._prefix(x, out_width)
        return F.conv2d(x, weight, bias, stride=self.stride, padding=self.padding)

    def by_input_unit(self, weight: Tensor) -> Tensor:
        return weight.flatten(2)

    def from_input_units(self, weight: Tensor) -> Tensor:
        return weight.unflatten(2, (self.kernel_size, self.kernel_size))

    def input_width(self, x: Tensor) -> int:
        return x.shape[1]

    def draw_units(self, count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Filters and biases of ``count`` new units, drawn as ``nn.Conv2d`` draws them (``U(-1/sqrt(fan_in),
        1/sqrt(fan_in))`` over the input channels' kernel entries)."""
        fan_in = self.weight[0].numel()
        weight, bias = uniform_init(count, fan_in, generator, self.weight)
        return weight.view(count, *self.weight.shape[1:]), bias

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_features}, out_channels={self.out_features}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )


class ExpandableCNN(ExpandableMLP):
    """Convolutional layers (filters as units), then fully connected ones, with one head per task: the paper's
    LeNet-style network for DEN on images (Yoon et al., 2018, §4).

    Each convolution is followed by ReLU and max pooling; the last pooled feature map is flattened
    channel by channel, so the filters alive for a task read a prefix of the flattened features and
    timestamped inference stays a slice of every layer. The fully connected layer after the flatten sees
    each filter of the last convolution as one unit (:attr:`ExpandableLinear.input_group` entries).

    Args:
        in_shape: ``(channels, height, width)`` of one input.
        channels: initial filters per convolution.
        hidden_sizes: initial units per fully connected hidden layer (one or more).
        head_classes: outputs of every task's head, or one number per task.
        kernel_size: side of every convolution's square kernel.
        padding: zero padding of every convolution.
        pool: side (and stride) of the max pooling after every convolution.

    Example:
        >>> cnn = ExpandableCNN((1, 8, 8), channels=[4, 6], hidden_sizes=[10], head_classes=2, kernel_size=3,
        ...                     padding=1)
        >>> cnn(torch.ones(5, 1, 8, 8), task=0).shape
        torch.Size([5, 2])
        >>> cnn.widths(0)
        (4, 6, 10)
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        channels: Sequence[int],
        hidden_sizes: Sequence[int],
        head_classes: int | Sequence[int],
        kernel_size: int = 5,
        padding: int = 0,
        pool: int = 2,
    ) -> None:
        nn.Module.__init__(self)
        shape = check_sizes("in_shape", in_shape)
        if len(shape) != 3:
            raise ValueError(f"`in_shape` must be (channels, height, width), got {list(in_shape)}")
        channels = check_sizes("channels", channels)
        hidden_sizes = self._checked_shape(shape[0], hidden_sizes, head_classes)
        self.in_shape = shape
        check_count("kernel_size", kernel_size)
        check_count("pool", pool)
        check_count("padding", padding, minimum=0)
        layers: list[ExpandableLinear] = []
        activations: list[nn.Module] = []
        below, side = shape[0], shape[1:]
        for width in channels:
            layers.append(ExpandableConv2d(below, width, kernel_size, padding=padding))
            activations.append(nn.Sequential(nn.ReLU(), nn.MaxPool2d(pool)))
            side = tuple((s + 2 * padding - kernel_size + 1) // pool for s in side)
            if min(side) < 1:
                raise ValueError(
                    f"a {shape[1]}x{shape[2]} input has no positions left after {len(layers)} convolutions of kernel "
                    f"{kernel_size} (padding {padding}) and pooling {pool}: use fewer convolutions, a smaller kernel "
                    "or padding"
                )
            below = width
        activations[-1].append(nn.Flatten())
        positions = side[0] * side[1]
        sizes = [below, *hidden_sizes]
        for index, (a, b) in enumerate(itertools.pairwise(sizes)):
            group = positions if index == 0 else 1
            layers.append(ExpandableLinear(a * group, b, input_group=group))
            activations.append(nn.ReLU())
        self._hold_layers(layers, nn.ModuleList(activations))

    def features(self, x: Tensor, task: int) -> Tensor:
        """Output of the last hidden layer for ``task`` from images ``[batch, *in_shape]`` or their flattened
        rows ``[batch, channels * height * width]`` (what the task streams serve)."""
        if x.ndim == 2 and x.shape[1] == math.prod(self.in_shape):
            x = x.view(-1, *self.in_shape)
        return super().features(x, task)

    def check_inputs(self, x: Tensor) -> None:
        """Raise a ``ValueError`` naming the expected shape unless ``x`` is ``[batch, *in_shape]``."""
        if x.ndim != 4 or tuple(x.shape[1:]) != self.in_shape:
            shape = ", ".join(map(str, self.in_shape))
            raise ValueError(
                f"expected images of shape [batch, {shape}] or rows of [batch, {math.prod(self.in_shape)}], got "
                f"{tuple(x.shape)}; reshape the inputs to the image shape the network was built with"
            )

    def architecture(self) -> dict[str, Any]:
        """:meth:`ExpandableMLP.architecture`, with the input's image shape."""
        return {**super().architecture(), "in_shape": list(self.in_shape)}

    def rebuild_(self, architecture: dict[str, Any]) -> None:
        """:meth:`ExpandableMLP.rebuild_`, refusing a network saved for another image shape."""
        saved = architecture.get("in_shape")
        if saved is None or tuple(saved) != self.in_shape:
            raise ValueError(
                f"the saved network reads images of shape {saved}, this one {list(self.in_shape)}: build the model "
                "with the configuration the checkpoint was trained with"
            )
        super().rebuild_(architecture)
