"""What the convolutional blocks of every method share (DEN's :class:`~lightning_den.core.den.conv.ExpandableCNN`,
Progressive Networks' :class:`~lightning_den.core.progressive.block.ProgressiveCNN`, PackNet's
:class:`~lightning_den.core.packnet.block.PackNetCNN`): the checks of the convolutions and of the modules after
them, the positions a flattened feature map leaves, images given as flattened rows, and the paper's LeNet.

A convolutional block is a method's MLP block with convolutions in front: its hidden layers are the
convolutions (``nn.Conv2d`` settings: kernel, stride, padding, dilation) and then the fully connected layers;
the module after the last convolution ends with ``nn.Flatten()``, which lays the feature map out channel by
channel, so the first fully connected layer reads ``positions`` inputs per channel of the last convolution.
Its ``hidden_sizes`` are the filters of each convolution followed by the units of each fully connected layer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_den.core.checks import check_count, check_sizes
from lightning_den.core.init import conv_settings
from lightning_den.core.tasks import ELEMENTWISE, activation_modules, require_tensor

#: parameter-free modules that act on each channel alone, so they can sit between convolutions whose filters
#: are added, removed or owned by tasks
CHANNELWISE = (*ELEMENTWISE, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)


def pooled_modules(convolutions: int, pool: int) -> list[nn.Sequential]:
    """ReLU and ``pool`` x ``pool`` max pooling after each convolution, then ``nn.Flatten()`` after the last.

    Example:
        >>> pooled_modules(2, 2)[-1]
        Sequential(
          (0): ReLU()
          (1): MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
          (2): Flatten(start_dim=1, end_dim=-1)
        )
    """
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


def fully_connected(
    convolutions: Sequence[nn.Conv2d], positions: int, sizes: Sequence[int], device: torch.device | str | None = None
) -> list[nn.Linear]:
    """Freshly drawn fully connected layers of ``sizes`` units after ``convolutions``: the first reads the last
    convolution's flattened map of ``positions`` per channel (on ``device``; meta: shapes only).

    Example:
        >>> fully_connected([nn.Conv2d(1, 4, 3)], positions=9, sizes=[5, 3])
        [Linear(in_features=36, out_features=5, bias=True), Linear(in_features=5, out_features=3, bias=True)]
    """
    widths = [convolutions[-1].out_channels * positions, *sizes]
    return [nn.Linear(a, b, device=device) for a, b in itertools.pairwise(widths)]


def with_weight(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """``layer`` (an ``nn.Linear`` or ``nn.Conv2d``) applied to ``x`` with ``weight`` in place of its own.

    Example:
        >>> conv = nn.Conv2d(1, 2, 3)
        >>> torch.equal(with_weight(conv, torch.ones(1, 1, 4, 4), conv.weight), conv(torch.ones(1, 1, 4, 4)))
        True
    """
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, weight, layer.bias)


def checked_convolutions(in_channels: int, convolutions: Sequence[nn.Conv2d]) -> list[nn.Conv2d]:
    """``convolutions`` checked: ``nn.Conv2d`` layers, each reading the channels below, with a bias, ``groups=1``
    and zero padding (what a block whose filters are units or owned by tasks can hold).

    Raises:
        ValueError: naming the convolution that cannot be held and why.
    """
    convolutions, below = list(convolutions), in_channels
    for index, conv in enumerate(convolutions):
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"`convolutions[{index}]` must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.in_channels != below or conv.bias is None or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(
                f"convolution {index} ({conv}) must read the {below} channels below it, with a bias, groups=1 "
                "and padding_mode='zeros'"
            )
        below = conv.out_channels
    if not convolutions:
        raise ValueError("a convolutional block needs at least one convolution; use the MLP block without")
    return convolutions


def checked_modules(activations: Sequence[nn.Module] | None, convolutions: int, linears: int) -> nn.ModuleList:
    """The module after each layer, checked: channelwise after a convolution, ``nn.Flatten()`` last after the last
    one, elementwise after a fully connected layer; ReLU and 2x2 max pooling after each convolution and ReLU
    after each fully connected layer when ``None``."""
    if activations is None:
        return nn.ModuleList([*pooled_modules(convolutions, 2), *activation_modules(None, linears)])
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
                f"{wrong} cannot sit between the convolutions of a task block: filters are added, removed or "
                "owned by tasks, so only parameter-free modules acting on each channel alone (activations, "
                "dropout, pooling) can; see lightning_den.core.convolutional.CHANNELWISE"
            )
    return nn.ModuleList([*modules[:convolutions], *activation_modules(modules[convolutions:], linears)])


class ConvolutionalBlock:
    """Mixin that puts convolutions in front of a method's MLP block (listed first among the bases).

    A subclass's constructor takes ``(in_channels, convolutions, positions, hidden_sizes, head_classes,
    activations=None, in_shape=None, **options)`` and checks them with :meth:`_checked_front` first;
    ``hidden_sizes`` are the fully connected layers' units.
    """

    in_shape: tuple[int, ...] | None
    in_features: int

    def _checked_front(
        self,
        in_channels: int,
        convolutions: Sequence[nn.Conv2d],
        positions: int,
        hidden_sizes: Sequence[int],
        head_classes: int | Sequence[int],
        activations: Sequence[nn.Module] | None,
        in_shape: Sequence[int] | None,
    ) -> tuple[tuple[int, ...], list[nn.Conv2d], nn.ModuleList]:
        """The constructor's arguments checked: the fully connected layers' units (``in_features`` and
        ``head_classes`` kept, as every block's constructor does), the convolutions, and the module after every
        layer; keeps ``in_shape`` after checking that its images leave ``positions`` per channel."""
        sizes = self._checked_shape(in_channels, hidden_sizes, head_classes)  # type: ignore[attr-defined]
        convolutions = checked_convolutions(in_channels, convolutions)
        #: each convolution's kernel, stride, padding and dilation, as plain data (saved in the architecture)
        self.convolution_settings = [
            {name: _plain(setting) for name, setting in conv_settings(conv).items()} for conv in convolutions
        ]
        check_count("positions", positions)
        modules = checked_modules(activations, len(convolutions), len(sizes))
        self.in_shape = None if in_shape is None else tuple(in_shape)
        if self.in_shape is not None:
            if len(self.in_shape) != 3 or self.in_shape[0] != in_channels:
                raise ValueError(f"`in_shape` must be ({in_channels}, height, width), got {list(in_shape)}")
            measured = flattened_positions(self.in_shape, convolutions, modules[: len(convolutions)])
            if measured != positions:
                raise ValueError(
                    f"`positions` is {positions}, but a {list(self.in_shape)} image leaves {measured} per channel "
                    "after the convolutions and their modules"
                )
        return sizes, convolutions, modules

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
        **options: Any,
    ) -> Self:
        """Square ``kernel_size`` convolutions of ``channels`` filters, each with ReLU and ``pool`` x ``pool``
        max pooling, then ReLU fully connected layers of ``hidden_sizes``, on images of ``in_shape``
        (the paper's LeNet: ``[20, 50]`` filters of 5x5, ``[800, 500]`` units, on 1x28x28); ``options`` go to
        the block (e.g. ``lateral``).

        Example:
            >>> from lightning_den.core.packnet import PackNetCNN
            >>> net = PackNetCNN.lenet((1, 28, 28), [20, 50], [800, 500], head_classes=2)
            >>> net.hidden_sizes, net.hidden[2].in_features   # 50 channels of 4x4 positions after two poolings
            ((20, 50, 800, 500), 800)

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
        activations = [*pooled_modules(len(widths), pool), *(nn.ReLU() for _ in hidden_sizes)]
        positions = flattened_positions(shape, convolutions, activations[: len(widths)])
        return cls(shape[0], convolutions, positions, hidden_sizes, head_classes, activations, shape, **options)

    def checked_inputs(self, x: Tensor) -> Tensor:
        """``x`` as images ``[batch, *in_shape]``: flattened rows (what the task streams serve) are reshaped when
        the image shape is known.

        Example:
            >>> from lightning_den.core.progressive import ProgressiveCNN
            >>> pnn = ProgressiveCNN.lenet((1, 8, 8), [2], [3], head_classes=2, kernel_size=3)
            >>> tuple(pnn.checked_inputs(torch.zeros(5, 64)).shape)
            (5, 1, 8, 8)

        Raises:
            TypeError: ``x`` is not a tensor (e.g. a whole ``(inputs, labels)`` batch).
            ValueError: naming the expected shape, unless ``x`` is a batch of images of this block's channels
                (and shape, when known) or their rows.
        """
        require_tensor(x)
        if self.in_shape is None:
            if x.ndim != 4 or x.shape[1] != self.in_features:
                raise ValueError(
                    f"expected images of shape [batch, {self.in_features}, height, width], got {tuple(x.shape)}"
                )
            return x
        if x.ndim == 2 and x.shape[1] == math.prod(self.in_shape):
            return x.view(-1, *self.in_shape)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.in_shape:
            shape = ", ".join(map(str, self.in_shape))
            raise ValueError(
                f"expected images of shape [batch, {shape}] or rows of [batch, {math.prod(self.in_shape)}], got "
                f"{tuple(x.shape)}; reshape the inputs to the image shape the network was built with"
            )
        return x

    def architecture(self) -> dict[str, Any]:
        """The MLP block's architecture, with the input's image shape and the convolutions' settings."""
        in_shape = None if self.in_shape is None else list(self.in_shape)
        mine = {"in_shape": in_shape, "convolutions": self.convolution_settings}
        return {**super().architecture(), **mine}  # type: ignore[misc]

    def rebuild_(self, architecture: dict[str, Any]) -> None:
        """The MLP block's ``rebuild_``, refusing a network saved for another image shape or other convolution
        settings (a state saved without them is taken as it is)."""
        mine = self.architecture()
        for key, what in (("in_shape", "reads images of shape"), ("convolutions", "has convolutions")):
            saved = architecture.get(key, mine[key] if key == "convolutions" else None)
            if saved != mine[key]:
                raise ValueError(
                    f"the saved network {what} {saved}, this one {mine[key]}: build the model with the "
                    "configuration the checkpoint was trained with"
                )
        super().rebuild_(architecture)  # type: ignore[misc]


def _plain(setting: tuple[int, ...] | str) -> list[int] | str:
    """A convolution's setting as plain data (``padding`` may be a string such as ``"same"``)."""
    return setting if isinstance(setting, str) else list(setting)
