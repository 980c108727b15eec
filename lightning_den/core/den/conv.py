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
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_den.core.convolutional import ConvolutionalBlock
from lightning_den.core.den.layers import ExpandableLinear, ExpandableMLP
from lightning_den.core.init import conv_settings


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
        kernel_size: kernel side, or ``(height, width)``.
        stride: as ``nn.Conv2d``'s.
        padding: zero padding, as ``nn.Conv2d``'s (``"same"`` too).
        dilation: as ``nn.Conv2d``'s.
        birth_task: task index recorded for the initial filters.

    Example:
        >>> import torch
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
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        birth_task: int = 0,
    ) -> None:
        nn.Module.__init__(self)  # the filter bank is nn.Conv2d's, not the ``[out, in]`` of ExpandableLinear
        reference = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation)
        self.kernel_size, self.stride = reference.kernel_size, reference.stride
        self.padding, self.dilation = reference.padding, reference.dilation
        self._hold(reference, birth_task)

    @classmethod
    def like(cls, conv: nn.Conv2d) -> ExpandableConv2d:
        """An expandable convolution of ``conv``'s shape and settings (freshly drawn weights)."""
        return cls(conv.in_channels, conv.out_channels, **conv_settings(conv))

    def compute(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """The convolution with the filter bank ``weight`` (a prefix of the filters over the channels ``x``
        carries, or the gathered subnetwork's)."""
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def forward_gathered(self, x: Tensor, alone: bool) -> Tensor:
        """As :meth:`ExpandableLinear.forward_gathered`; with every filter taking part, the gradient of the
        filter bank is formed whole and then gathered (through the gathered entries written into it)."""
        if alone:
            return super().forward_gathered(x, alone)
        rows, units = self._gathered
        weight, bias = self.gathered_parameters()
        bank = self.by_input_unit(self.weight.detach()).index_put((rows[:, None], units), self.by_input_unit(weight))
        return self.compute(x, self.from_input_units(bank), self.bias.detach().index_put((rows,), bias))

    def forward_outside(self, x: Tensor) -> Tensor:
        """As :meth:`ExpandableLinear.forward_outside`, with the gradient of the filter bank formed whole and then
        sliced (the bank assembled from the trained Parameters)."""
        return self.compute(x, *self._assembled())

    def by_input_unit(self, weight: Tensor) -> Tensor:
        """``[filters, channels, kh, kw]`` as ``[filters, channels, kh * kw]``: a filter reads a channel through
        its kernel slice."""
        return weight.flatten(2)

    def from_input_units(self, weight: Tensor) -> Tensor:
        """``[filters, channels, kh * kw]`` back to the filter bank's ``[filters, channels, kh, kw]``."""
        return weight.unflatten(2, self.kernel_size)

    def input_width(self, x: Tensor) -> int:
        """The channels of ``x`` ``[batch, channels, height, width]``."""
        return x.shape[1]

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_features}, out_channels={self.out_features}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )


class ExpandableCNN(ConvolutionalBlock, ExpandableMLP):
    """Convolutions (filters as units), then fully connected layers, with one head per task.

    The module after the last convolution ends with ``nn.Flatten()``, which lays the feature map out channel
    by channel, so the filters alive for a task feed a prefix of the flattened features and timestamped
    inference stays a slice of every layer; the first fully connected layer sees each filter of the last
    convolution as one unit of ``positions`` inputs (:attr:`ExpandableLinear.input_group`).

    Args:
        in_channels: channels of the input images.
        convolutions: the convolutions of task 0 (``nn.Conv2d`` modules: their shapes and settings are taken,
            the weights are drawn afresh; each must have a bias, ``groups=1`` and zero padding).
        positions: positions per channel of the last convolution's flattened output (height x width after
            pooling).
        hidden_sizes: initial units per fully connected hidden layer (one or more).
        head_classes: outputs of every task's head, or one number per task.
        activations: the module after each convolution and each fully connected hidden layer: channelwise and
            parameter-free after a convolution (activations, dropout, pooling: see
            :data:`~lightning_den.core.convolutional.CHANNELWISE`), with ``nn.Flatten()`` ending the last
            convolution's; elementwise after a fully connected layer. Default: ReLU and 2x2 max pooling after
            each convolution, ReLU after each fully connected layer.
        in_shape: ``(channels, height, width)`` of one input when known: inputs are then checked against it
            and may also come as flattened rows.

    The paper's LeNet is :meth:`~lightning_den.core.convolutional.ConvolutionalBlock.lenet`. Example:
        >>> import torch
        >>> cnn = ExpandableCNN.lenet((1, 8, 8), [4, 6], [10], head_classes=2, kernel_size=3, padding=1)
        >>> cnn(torch.ones(5, 1, 8, 8), task=0).shape
        torch.Size([5, 2])
        >>> cnn.widths(0)
        (4, 6, 10)
    """

    def __init__(
        self,
        in_channels: int,
        convolutions: Sequence[nn.Conv2d],
        positions: int,
        hidden_sizes: Sequence[int],
        head_classes: int | Sequence[int],
        activations: Sequence[nn.Module] | None = None,
        in_shape: Sequence[int] | None = None,
    ) -> None:
        nn.Module.__init__(self)  # ExpandableMLP's constructor builds Linear layers only; _hold_layers is shared
        hidden_sizes, convolutions, modules = self._checked_front(
            in_channels, convolutions, positions, hidden_sizes, head_classes, activations, in_shape
        )
        layers: list[ExpandableLinear] = [ExpandableConv2d.like(conv) for conv in convolutions]
        below = convolutions[-1].out_channels
        sizes = [below, *hidden_sizes]
        for index, (a, b) in enumerate(itertools.pairwise(sizes)):
            group = positions if index == 0 else 1
            layers.append(ExpandableLinear(a * group, b, input_group=group))
        self._hold_layers(layers, modules)
