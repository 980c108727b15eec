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
from lightning_den.core.tasks import ELEMENTWISE, activation_modules


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
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation)

    def forward(self, x: Tensor, out_width: int | None = None) -> Tensor:
        """The convolution with the first ``out_width`` filters over the channels ``x`` carries."""
        weight, bias = self._prefix(x, out_width)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

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


#: parameter-free modules that act on each channel alone, so they can sit between growing convolutions
CHANNELWISE = (*ELEMENTWISE, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)


def _pooled(convolutions: int, pool: int) -> list[nn.Sequential]:
    """ReLU and ``pool`` x ``pool`` max pooling after each convolution, then ``nn.Flatten()`` after the last."""
    modules = [nn.Sequential(nn.ReLU(), nn.MaxPool2d(pool)) for _ in range(convolutions)]
    modules[-1].append(nn.Flatten())
    return modules


def flattened_positions(
    in_shape: Sequence[int], convolutions: Sequence[nn.Conv2d], modules: Sequence[nn.Module]
) -> int:
    """Positions per channel of the last convolution's flattened output, for images of ``in_shape`` through
    ``convolutions`` and the module after each (shapes only, on the meta device).

    Example:
        >>> convs = [nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3)]
        >>> flattened_positions((1, 16, 16), convs, [nn.MaxPool2d(2), nn.Sequential(nn.MaxPool2d(2), nn.Flatten())])
        4

    Raises:
        ValueError: when no position is left.
    """
    h = torch.zeros(1, *in_shape, device="meta")
    try:
        for conv, module in zip(convolutions, modules, strict=True):
            weight = torch.zeros(conv.weight.shape, device="meta")
            h = module(F.conv2d(h, weight, None, conv.stride, conv.padding, conv.dilation))
    except RuntimeError as error:  # a kernel larger than what is left of the image
        raise ValueError(
            f"a {list(in_shape)} image has no positions left after the convolutions and pooling ({error}): use "
            "fewer convolutions, smaller kernels, less pooling or padding"
        ) from None
    if h.ndim != 2 or h.shape[1] == 0:
        raise ValueError(f"a {list(in_shape)} image leaves a {list(h.shape[1:])} output: no positions left")
    return h.shape[1] // convolutions[-1].out_channels


class ExpandableCNN(ExpandableMLP):
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
            parameter-free (:data:`CHANNELWISE`: activations, dropout, pooling) after a convolution, with
            ``nn.Flatten()`` ending the last convolution's; elementwise after a fully connected layer.
            Default: ReLU and 2x2 max pooling after each convolution, ReLU after each fully connected layer.
        in_shape: ``(channels, height, width)`` of one input when known: inputs are then checked against it
            and may also come as flattened rows.

    The paper's LeNet is :meth:`lenet`. Example:
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
        hidden_sizes = self._checked_shape(in_channels, hidden_sizes, head_classes)
        check_count("positions", positions)
        below, layers = in_channels, []
        for index, conv in enumerate(convolutions):
            if not isinstance(conv, nn.Conv2d):
                raise ValueError(f"`convolutions[{index}]` must be an nn.Conv2d, got {type(conv).__name__}")
            if conv.in_channels != below or conv.bias is None or conv.groups != 1 or conv.padding_mode != "zeros":
                raise ValueError(
                    f"convolution {index} ({conv}) must read the {below} channels below it, with a bias, groups=1 "
                    "and padding_mode='zeros', to grow its filters"
                )
            layers.append(ExpandableConv2d.like(conv))
            below = conv.out_channels
        if not layers:
            raise ValueError("an ExpandableCNN needs at least one convolution; use an ExpandableMLP without")
        modules = self._checked_activations(activations, len(layers), len(hidden_sizes))
        self.in_shape = None if in_shape is None else tuple(in_shape)
        if self.in_shape is not None:
            if len(self.in_shape) != 3 or self.in_shape[0] != in_channels:
                raise ValueError(f"`in_shape` must be ({in_channels}, height, width), got {list(in_shape)}")
            measured = flattened_positions(self.in_shape, convolutions, modules[: len(layers)])
            if measured != positions:
                raise ValueError(
                    f"`positions` is {positions}, but a {list(self.in_shape)} image leaves {measured} per channel "
                    "after the convolutions and their modules"
                )
        sizes = [below, *hidden_sizes]
        for index, (a, b) in enumerate(itertools.pairwise(sizes)):
            group = positions if index == 0 else 1
            layers.append(ExpandableLinear(a * group, b, input_group=group))
        self._hold_layers(layers, modules)

    @classmethod
    def lenet(
        cls,
        in_shape: Sequence[int],
        channels: Sequence[int],
        hidden_sizes: Sequence[int],
        head_classes: int | Sequence[int],
        kernel_size: int = 5,
        padding: int = 0,
        pool: int = 2,
    ) -> ExpandableCNN:
        """Square ``kernel_size`` convolutions of ``channels`` filters, each with ReLU and ``pool`` x ``pool``
        max pooling, then ReLU fully connected layers of ``hidden_sizes``, on images of ``in_shape``
        (the paper's LeNet: ``[20, 50]`` filters of 5x5, ``[800, 500]`` units, on 1x28x28).

        Raises:
            ValueError: when the image has no positions left after the convolutions and pooling.
        """
        shape = check_sizes("in_shape", in_shape)
        if len(shape) != 3:
            raise ValueError(f"`in_shape` must be (channels, height, width), got {list(in_shape)}")
        check_count("kernel_size", kernel_size)
        check_count("pool", pool)
        check_count("padding", padding, minimum=0)
        widths = check_sizes("channels", channels)
        with torch.random.fork_rng(devices=[]):  # only their shapes are used: the block draws its own weights
            convolutions = [
                nn.Conv2d(a, b, kernel_size, padding=padding, device="meta")
                for a, b in itertools.pairwise([shape[0], *widths])
            ]
        activations = [*_pooled(len(widths), pool), *(nn.ReLU() for _ in hidden_sizes)]
        positions = flattened_positions(shape, convolutions, activations[: len(widths)])
        return cls(shape[0], convolutions, positions, hidden_sizes, head_classes, activations, shape)

    @staticmethod
    def _checked_activations(activations: Sequence[nn.Module] | None, convolutions: int, linears: int) -> nn.ModuleList:
        """The module after each layer, checked: channelwise after a convolution, ``nn.Flatten()`` last after the
        last one, elementwise after a fully connected layer."""
        if activations is None:
            return nn.ModuleList([*_pooled(convolutions, 2), *activation_modules(None, linears)])
        modules = list(activations)
        if len(modules) != convolutions + linears:
            raise ValueError(f"need one module after each of the {convolutions + linears} layers, got {len(modules)}")
        for index, module in enumerate(modules[:convolutions]):
            parts = list(module) if isinstance(module, nn.Sequential) else [module]
            last = index == convolutions - 1
            if last and not (parts and isinstance(parts[-1], nn.Flatten)):
                raise ValueError("the module after the last convolution must end with nn.Flatten()")
            wrong = [type(p).__name__ for p in (parts[:-1] if last else parts) if not isinstance(p, CHANNELWISE)]
            if wrong:
                raise ValueError(
                    f"{wrong} cannot sit between growing convolutions: filters are added and removed, so only "
                    "parameter-free modules acting on each channel alone (activations, dropout, pooling) can; see "
                    "lightning_den.core.den.conv.CHANNELWISE"
                )
        return nn.ModuleList([*modules[:convolutions], *activation_modules(modules[convolutions:], linears)])

    def features(self, x: Tensor, task: int) -> Tensor:
        """Output of the last hidden layer for ``task`` from images ``[batch, *in_shape]`` or, when the image
        shape is known, their flattened rows (what the task streams serve)."""
        if self.in_shape is not None and x.ndim == 2 and x.shape[1] == math.prod(self.in_shape):
            x = x.view(-1, *self.in_shape)
        return super().features(x, task)

    def check_inputs(self, x: Tensor) -> None:
        """Raise a ``ValueError`` naming the expected shape unless ``x`` is a batch of images of this network's
        channels (and shape, when known)."""
        if self.in_shape is None:
            if x.ndim != 4 or x.shape[1] != self.in_features:
                raise ValueError(
                    f"expected images of shape [batch, {self.in_features}, height, width], got {tuple(x.shape)}"
                )
            return
        if x.ndim != 4 or tuple(x.shape[1:]) != self.in_shape:
            shape = ", ".join(map(str, self.in_shape))
            raise ValueError(
                f"expected images of shape [batch, {shape}] or rows of [batch, {math.prod(self.in_shape)}], got "
                f"{tuple(x.shape)}; reshape the inputs to the image shape the network was built with"
            )

    def architecture(self) -> dict[str, Any]:
        """:meth:`ExpandableMLP.architecture`, with the input's image shape."""
        return {**super().architecture(), "in_shape": None if self.in_shape is None else list(self.in_shape)}

    def rebuild_(self, architecture: dict[str, Any]) -> None:
        """:meth:`ExpandableMLP.rebuild_`, refusing a network saved for another image shape."""
        saved = architecture.get("in_shape")
        if (None if saved is None else tuple(saved)) != self.in_shape:
            this = None if self.in_shape is None else list(self.in_shape)
            raise ValueError(
                f"the saved network reads images of shape {saved}, this one {this}: build the model with the "
                "configuration the checkpoint was trained with"
            )
        super().rebuild_(architecture)
