"""Finding the block a method trains in a user's model, and converting a plain chain of ``nn.Linear`` layers
into one in place (as peft targets modules: by name, or found when there is exactly one candidate).

A *linear chain* is an ``nn.Sequential`` whose children are ``nn.Linear`` layers (two or more, with biases)
and, between them, parameter-free elementwise modules (:data:`~lightning_den.core.tasks.ELEMENTWISE`:
activations, dropout). It starts and ends with a Linear. The hidden Linears become the block's first
layers and the last one task 0's head, with the same weights and the same modules between them, so the
converted model computes bit for bit what the chain computed. Every method converts through this module.

A chain may also start with ``nn.Conv2d`` layers (with biases), with channelwise modules between them
(:data:`~lightning_den.core.convolutional.CHANNELWISE`: activations, dropout, pooling) and one ``nn.Flatten``
after the last: each method converts it into its convolutional block (DEN's
:class:`~lightning_den.core.den.conv.ExpandableCNN`, whose filters grow; Progressive Networks' and PackNet's
CNNs), and a block type without a convolutional form refuses it.

Example:
    >>> from lightning_den.core.den import ExpandableMLP
    >>> model = nn.Module()
    >>> model.net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    >>> name, block = attach_block(model, ExpandableMLP)
    >>> name, type(model.net).__name__, block.widths(0)
    ('net', 'ExpandableMLP', (3,))
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_den.core.convolutional import CHANNELWISE, ConvolutionalBlock
from lightning_den.core.routing import task_blocks
from lightning_den.core.tasks import ELEMENTWISE


@dataclass(frozen=True)
class LinearChain:
    """A chain's layers: the hidden layers (its convolutions first, if any, then Linears), the module after each
    (one, or an ``nn.Sequential`` of several), and the head."""

    hidden: list[nn.Module]
    activations: list[nn.Module]
    head: nn.Linear

    @property
    def convolutions(self) -> list[nn.Conv2d]:
        return [layer for layer in self.hidden if isinstance(layer, nn.Conv2d)]

    @property
    def in_features(self) -> int:
        """Input width, or input channels of a chain that starts with convolutions."""
        first = self.hidden[0]
        return first.in_channels if isinstance(first, nn.Conv2d) else first.in_features

    @property
    def hidden_sizes(self) -> list[int]:
        """Units of its hidden Linear layers."""
        return [layer.out_features for layer in self.hidden if isinstance(layer, nn.Linear)]

    @torch.no_grad()
    def copy_into_(self, hidden: list[nn.Module], head: nn.Module) -> None:
        """Copy the chain's weights and biases into a block's ``hidden`` layers and task 0's ``head``."""
        for source, target in zip([*self.hidden, self.head], [*hidden, head], strict=True):
            target.weight.copy_(source.weight)
            target.bias.copy_(source.bias)


def linear_chain(sequential: nn.Module, name: str) -> LinearChain:
    """``sequential`` read as a :class:`LinearChain`.

    Raises:
        ValueError: naming the module that stops the conversion and what to do about it.
    """
    if not isinstance(sequential, nn.Sequential):
        raise ValueError(f"`{name}` is a {type(sequential).__name__}, not an nn.Sequential of Linear layers")
    children = list(sequential.named_children())
    layers = [index for index, (_, child) in enumerate(children) if isinstance(child, nn.Linear | nn.Conv2d)]
    convolutions = [index for index in layers if isinstance(children[index][1], nn.Conv2d)]
    allowed = (nn.Linear, *ELEMENTWISE, *((nn.Conv2d, nn.Flatten, *CHANNELWISE) if convolutions else ()))
    for child_name, child in children:
        if not isinstance(child, allowed):
            raise ValueError(
                f"`{name}.{child_name}` is a {type(child).__name__}: only nn.Linear layers and parameter-free "
                "elementwise modules (activations, dropout) can be converted into a growing block, because its "
                "layers gain and lose units (and, before them, nn.Conv2d layers with channelwise modules such as "
                "pooling and one nn.Flatten). Keep that module outside the chain (e.g. a feature extractor before "
                "it) or name another block"
            )
        if isinstance(child, nn.Linear | nn.Conv2d) and child.bias is None:
            raise ValueError(f"`{name}.{child_name}` has no bias: build it with `bias=True` to convert it")
    linears = layers[len(convolutions) :]
    if (
        len(linears) < 2
        or layers[0] != 0
        or layers[-1] != len(children) - 1
        or convolutions != layers[: len(convolutions)]
    ):
        raise ValueError(
            f"`{name}` must start with an nn.Linear (or its nn.Conv2d layers), end with an nn.Linear and hold at "
            f"least two Linears (hidden layers, then the head); it holds {[type(c).__name__ for _, c in children]}"
        )
    activations = []
    for start, end in itertools.pairwise(layers):
        between = [child for _, child in children[start + 1 : end]]
        flatten = [index for index, child in enumerate(between) if isinstance(child, nn.Flatten)]
        if any(between[index].start_dim != 1 or between[index].end_dim != -1 for index in flatten):
            raise ValueError(f"`{name}`'s nn.Flatten must flatten each example whole: nn.Flatten() (dims 1 to -1)")
        if flatten != ([len(between) - 1] if end == linears[0] and convolutions else []):
            raise ValueError(
                f"`{name}` needs one nn.Flatten, the last module between its nn.Conv2d and nn.Linear layers"
            )
        activations.append(between[0] if len(between) == 1 else nn.Sequential(*between))
    return LinearChain(
        hidden=[children[index][1] for index in layers[:-1]], activations=activations, head=children[-1][1]
    )


def linear_chains(model: nn.Module, block_type: Any = None) -> tuple[dict[str, nn.Sequential], list[str]]:
    """Every ``nn.Sequential`` of ``model`` that converts into a block (into a ``block_type``, when given: chains
    that start with convolutions only for a block type with a convolutional form), and why each other one holding
    a Linear layer does not."""
    chains, refused = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and name:
            try:
                chain = linear_chain(module, name)
            except ValueError as error:
                if any(isinstance(child, nn.Linear) for child in module.children()):
                    refused.append(str(error))
                continue
            grows = _grows_convolutions if chain.convolutions else _grows_fully_connected
            if block_type is None or grows(block_type):
                chains[name] = module
            elif chain.convolutions:
                refused.append(f"`{name}`: {_cannot_grow_convolutions(block_type)}")
    return chains, refused


def attach_block(
    model: nn.Module, block_type: Any, name: str | None = None, options: dict[str, Any] | None = None
) -> tuple[str, nn.Module]:
    """The ``block_type`` submodule of ``model`` to train, converting a linear chain into one in place.

    ``name`` names it (a block, or a chain to convert); without a name, the only block of ``block_type``, or
    else the only linear chain, is taken (and converted by :func:`block_from_chain`, with ``options`` for the
    block's constructor, e.g. ``{"lateral": False}``).

    Raises:
        ValueError: nothing to train, several candidates and no ``name``, or ``name`` cannot be converted; the
            message names what was found and the argument that fixes it.
    """
    return next(iter(attach_blocks(model, block_type, [name], options).items()))


def attach_blocks(
    model: nn.Module, block_type: Any, names: list[str | None], options: dict[str, Any] | None = None
) -> dict[str, nn.Module]:
    """:func:`attach_block` for each of ``names``, by name: every name is checked before any chain is
    converted, so a wrong name leaves the model as it was.

    Raises:
        ValueError: as :func:`attach_block`, for the first name that cannot be trained.
    """
    found = [_find_block(model, block_type, name) for name in names]
    attached = {}
    for name, target in found:
        if isinstance(target, LinearChain):
            target = block_from_chain(block_type, target, **(options or {}))
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attribute, target)
        attached[name] = target
    return attached


def _find_block(model: nn.Module, block_type: Any, name: str | None) -> tuple[str, nn.Module | LinearChain]:
    """What :func:`attach_block` trains for ``name``: a ``block_type`` of the model, or a chain to convert."""
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, block_type)}
    kind = block_type.__name__
    if name is None and len(blocks) == 1:
        return next(iter(blocks.items()))
    if name is None and blocks:
        raise ValueError(
            f"{type(model).__name__} has several {kind} blocks {sorted(blocks)}; name the one to train with the "
            "callback's `block=...` argument"
        )
    if name in blocks:
        return name, blocks[name]
    others = {n: type(m).__name__ for n, m in task_blocks(model).items() if n}
    if name is None and not blocks and others:
        raise ValueError(
            f"{type(model).__name__} holds the blocks {others} of another method, not a {kind}: the model was built "
            "for another method than this callback's (with `--ckpt_path`, lightning-den builds the model from the "
            "checkpoint's hyperparameters). Use the callback (and configuration) of the method that trained it"
        )
    if name is None:
        chains, refused = linear_chains(model, block_type)
        if len(chains) != 1:
            linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            found = (
                f"several nn.Sequential chains of Linear layers {sorted(chains)}; name the one to grow"
                if chains
                else f"no {kind} and no nn.Sequential chain of Linear layers to convert (Linear layers at "
                f"{linear or 'none'}{'; ' + refused[0] if refused else ''}); put the MLP part in an "
                f"nn.Sequential of Linear layers and activations (or build it as a `lightning_den.{kind}`) and name it"
            )
            raise ValueError(f"{type(model).__name__} has {found} with the callback's `block=...` argument")
        name = next(iter(chains))
    try:
        target = model.get_submodule(name)
    except AttributeError:
        names = sorted({*blocks, *linear_chains(model, block_type)[0]})
        raise ValueError(
            f"`block={name!r}` is not a module of {type(model).__name__}; its blocks and convertible chains are: "
            f"{names or 'none'}"
        ) from None
    chain = linear_chain(target, name)
    shared = [n for n, m in model.named_modules(remove_duplicate=False) if any(m is layer for layer in chain.hidden)]
    if len(shared) > len(chain.hidden):
        raise ValueError(
            f"a Linear layer of `{name}` is also registered elsewhere in the model ({shared}); converting it would "
            "leave the other reference on the old layer. Give that part its own layers"
        )
    return name, chain


def block_from_chain(block_type: Any, chain: LinearChain, **options: Any) -> nn.Module:
    """A ``block_type`` computing what ``chain`` computes: its hidden Linears, the modules between them, and its
    last Linear as task 0's head (same weights, device and dtype); the global RNG is left as it was.

    Example:
        >>> from lightning_den.core.packnet import PackNetMLP
        >>> chain = linear_chain(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), "net")
        >>> block_from_chain(PackNetMLP, chain).hidden_sizes
        (3,)
    """
    with torch.random.fork_rng(devices=[]):
        classes = chain.head.out_features
        if not chain.convolutions and not _grows_fully_connected(block_type):
            raise ValueError(
                f"a {block_type.__name__} starts with convolutions, and this chain has none: build the model the "
                "checkpoint was trained with"
            )
        if chain.convolutions:
            block = _convolutional(block_type)(chain, classes, **options)
        else:
            block = block_type(chain.in_features, chain.hidden_sizes, classes, activations=chain.activations, **options)
    block = block.to(chain.head.weight)
    chain.copy_into_(*block.first_task_layers())
    return block


def _grows_fully_connected(block_type: Any) -> bool:
    """Whether ``block_type`` is built from a chain of Linear layers alone (every block but a convolutional one)."""
    return not issubclass(block_type, ConvolutionalBlock)


def _convolutional_sibling(block_type: Any) -> type[nn.Module] | None:
    """The convolutional block of the method whose block is ``block_type`` (``None`` for a block type without one)."""
    from lightning_den.core.den.conv import ExpandableCNN
    from lightning_den.core.den.layers import ExpandableMLP
    from lightning_den.core.packnet.block import PackNetCNN, PackNetMLP
    from lightning_den.core.progressive.block import ProgressiveCNN, ProgressiveMLP

    pairs = ((ExpandableMLP, ExpandableCNN), (ProgressiveMLP, ProgressiveCNN), (PackNetMLP, PackNetCNN))
    return next((cnn for mlp, cnn in pairs if issubclass(cnn, block_type) and issubclass(block_type, mlp)), None)


def _grows_convolutions(block_type: Any) -> bool:
    """Whether ``block_type`` (or its convolutional sibling) can be built from a chain that starts with
    convolutions."""
    return _convolutional_sibling(block_type) is not None


def _cannot_grow_convolutions(block_type: Any) -> str:
    return (
        f"a {block_type.__name__} grows fully connected layers only, and this chain starts with nn.Conv2d layers: "
        "keep the convolutions outside the chain (a feature extractor before it), or train it with a method whose "
        "block has a convolutional form (DEN, Progressive Networks, PackNet)"
    )


def _convolutional(block_type: Any) -> Callable[..., nn.Module]:
    """What builds ``block_type``'s convolutional block from a chain that starts with convolutions.

    Raises:
        ValueError: when the method has no convolutional block.
    """
    sibling = _convolutional_sibling(block_type)
    if sibling is None:
        raise ValueError(_cannot_grow_convolutions(block_type))

    def build(chain: LinearChain, classes: int, **options: Any) -> nn.Module:
        last, first_linear = chain.convolutions[-1], chain.hidden[len(chain.convolutions)]
        positions, rest = divmod(first_linear.in_features, last.out_channels)
        if rest or not positions:
            raise ValueError(
                f"the first nn.Linear reads {first_linear.in_features} features, which is not a whole number of "
                f"positions per channel of the last nn.Conv2d ({last.out_channels} channels)"
            )
        return sibling(
            chain.in_features, chain.convolutions, positions, chain.hidden_sizes, classes, chain.activations, **options
        )

    return build


def load_grown(model: nn.Module, checkpoint_path: str | Path, map_location: Any = "cpu") -> nn.Module:
    """Load a checkpoint of a sequence trained by a lightning_den callback into ``model``, a freshly built
    instance of the user's own class: every block saved in it (``<name>._extra_state``) is converted from
    ``model``'s chain of that name as the callback did, grown to the saved architecture, then all weights
    load (``torch.load(..., weights_only=True)``: plain data only). Returns ``model``.

    Example::

        model = lightning_den.load_grown(MyModel(), "checkpoints/last.ckpt")
        with lightning_den.task(model, 0):
            logits = model(x)   # task 0 as it stood at the end of task 0
    """
    checkpoint = torch.load(checkpoint_path, map_location=map_location, weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    for name, block_type in saved_blocks(state).items():
        options = block_type.options_of(state[f"{name}._extra_state"]["architecture"])
        attach_block(model, block_type, name, options)
    model.load_state_dict(state)
    return model


def saved_blocks(state_dict: dict[str, Any], prefix: str = "") -> dict[str, type[nn.Module]]:
    """The blocks a model's ``state_dict`` holds (each block saves its type in ``<name>._extra_state``), by
    name relative to ``prefix``.

    Example:
        >>> from lightning_den.core.den import ExpandableMLP
        >>> model = nn.Module()
        >>> model.net = ExpandableMLP(4, [3], head_classes=[2])
        >>> {name: block.__name__ for name, block in saved_blocks(model.state_dict()).items()}
        {'net': 'ExpandableMLP'}
    """
    suffix = "._extra_state"
    return {
        key[len(prefix) : -len(suffix)]: BLOCK_TYPES[saved["block"]]
        for key, saved in state_dict.items()
        if key.startswith(prefix)
        and key.endswith(suffix)
        and isinstance(saved, dict)
        and saved.get("block") in BLOCK_TYPES
    }


def _block_types() -> dict[str, type[nn.Module]]:
    from lightning_den.core.den.conv import ExpandableCNN
    from lightning_den.core.den.layers import ExpandableMLP
    from lightning_den.core.packnet.block import PackNetCNN, PackNetMLP
    from lightning_den.core.progressive.block import ProgressiveCNN, ProgressiveMLP

    blocks = (ExpandableMLP, ExpandableCNN, PackNetMLP, PackNetCNN, ProgressiveMLP, ProgressiveCNN)
    return {block.__name__: block for block in blocks}


#: the blocks a checkpoint can name (``"block"`` in a block's saved state)
BLOCK_TYPES = _block_types()
