"""Progressive Networks and PackNet on convolutional blocks, property-tested: a finished task's outputs never
depend on what later tasks add or train (columns, lateral adapters, weights a task does not own), bit for bit,
over random image sizes, kernels, padding and widths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from torch import nn

from lightning_den.core.den import ExpandableCNN
from lightning_den.core.packnet import PackNetCNN, PackNetMLP
from lightning_den.core.progressive import ProgressiveCNN
from lightning_den.core.progressive.block import LateralAdapter
from tests.core.helpers import FAST


@st.composite
def lenet_shapes(draw) -> dict:
    """Arguments of ``lenet``: an image, one or two convolutions, one or two fully connected layers."""
    kernel, padding = draw(st.integers(1, 3), label="kernel"), draw(st.integers(0, 1), label="padding")
    side = draw(st.integers(6, 10), label="side")
    convolutions = draw(st.integers(1, 2), label="convolutions")
    side_after = side
    for _ in range(convolutions):  # each convolution, then 2x2 pooling, must leave a position
        side_after = (side_after + 2 * padding - kernel + 1) // 2
    if side_after < 1:
        convolutions, side_after = 1, (side + 2 * padding - kernel + 1) // 2
    return dict(
        in_shape=(draw(st.integers(1, 2), label="channels"), side, side),
        channels=draw(st.lists(st.integers(1, 4), min_size=convolutions, max_size=convolutions), label="filters"),
        hidden_sizes=draw(st.lists(st.integers(1, 5), min_size=1, max_size=2), label="units"),
        head_classes=draw(st.integers(1, 3), label="classes"),
        kernel_size=kernel,
        padding=padding,
    )


@torch.no_grad()
def outputs(block: nn.Module, x: torch.Tensor, tasks: int) -> list[torch.Tensor]:
    return [block(x, task=t).clone() for t in range(tasks)]


@FAST
@given(shape=lenet_shapes(), lateral=st.booleans(), seed=st.integers(0, 2**16))
def test_new_columns_never_change_what_earlier_tasks_compute(shape, lateral, seed):
    torch.manual_seed(seed)
    pnn = ProgressiveCNN.lenet(**shape, lateral=lateral)
    x = torch.randn(3, *shape["in_shape"])
    before = outputs(pnn, x, 1)
    for task in (1, 2):
        pnn.add_task_(torch.Generator().manual_seed(seed + task))
        with torch.no_grad():  # train the new column as hard as you like: earlier tasks never read it
            for parameter in pnn.column_parameters(task):
                parameter.add_(torch.randn_like(parameter))
        assert all(torch.equal(a, b) for a, b in zip(outputs(pnn, x, task), before, strict=True))
        before = outputs(pnn, x, task + 1)
    assert pnn.widths(2) == tuple((3 if lateral else 1) * size for size in pnn.hidden_sizes)


@FAST
@given(shape=lenet_shapes(), seed=st.integers(0, 2**16))
def test_lateral_adapters_reduce_channels_with_1x1_convolutions_and_feed_each_layer_as_it_reads(shape, seed):
    torch.manual_seed(seed)
    pnn = ProgressiveCNN.lenet(**shape)
    pnn.add_task_(torch.Generator().manual_seed(seed))
    pnn.add_task_(torch.Generator().manual_seed(seed + 1))
    column, convolutions = pnn.columns[2], len(shape["channels"])
    layers = [*column.hidden[1:], column.head]
    for index, (below, layer, adapter) in enumerate(zip(column.hidden, layers, column.laterals, strict=True)):
        assert adapter.U.bias is None
        if isinstance(layer, nn.Conv2d):  # a 1x1 reduction of two columns' maps, then the layer's own kernel
            assert (adapter.V.kernel_size, adapter.V.in_channels) == ((1, 1), 2 * layer.in_channels)
            settings = ("kernel_size", "stride", "padding", "dilation")
            assert [getattr(adapter.U, a) for a in settings] == [getattr(layer, a) for a in settings]
        elif index == convolutions - 1:  # the flattened maps: the channels reduced at every position alike
            assert isinstance(adapter.V, nn.Conv1d) and adapter.V.in_channels == 2 * below.out_channels
            assert adapter.positions * below.out_channels == layer.in_features
        else:
            assert adapter.V.in_features == 2 * layer.in_features
    single = ProgressiveCNN.lenet(**shape, lateral=False)
    assert single.num_parameters(0) == pnn.num_parameters(0)  # column 0 is one plain CNN


@pytest.mark.parametrize("lateral", [True, False])
def test_the_newest_cnn_column_reads_earlier_columns_only_when_lateral(lateral):
    torch.manual_seed(0)
    pnn = ProgressiveCNN.lenet((1, 8, 8), [3, 4], [6], head_classes=2, kernel_size=3, padding=1, lateral=lateral)
    pnn.add_task_()
    x = torch.randn(5, 1, 8, 8)
    before = pnn(x, task=1).detach().clone()
    for layer in pnn.columns[0].hidden:  # change each of column 0's layers in turn: column 1 sees it if lateral
        with torch.no_grad():
            layer.weight.add_(0.5)
            assert torch.equal(pnn(x, task=1), before) is not lateral, type(layer).__name__
            layer.weight.sub_(0.5)
            before = pnn(x, task=1).clone()


def test_gradients_of_the_newest_cnn_column_reach_every_lateral_adapter():
    torch.manual_seed(0)
    pnn = ProgressiveCNN.lenet((1, 8, 8), [3, 4], [6, 5], head_classes=2, kernel_size=3, padding=1)
    pnn.add_task_()
    pnn.add_task_()
    pnn(torch.randn(5, 1, 8, 8), task=2).square().sum().backward()
    adapters = pnn.columns[2].laterals
    assert [type(adapter.V).__name__ for adapter in adapters] == ["Conv2d", "Conv1d", "Linear", "Linear"]
    for index, adapter in enumerate(adapters):
        for name, parameter in adapter.named_parameters():
            assert parameter.grad is not None and bool(parameter.grad.ne(0).any()), (index, name)


def test_a_lateral_adapter_into_a_convolution_keeps_the_layers_output_shape():
    layer = nn.Conv2d(4, 6, 3, stride=2, padding=1)
    adapter = LateralAdapter.into(layer, columns=3)
    earlier = torch.randn(2, 12, 9, 9)  # three earlier columns' 4-channel maps, concatenated
    assert adapter(earlier).shape == layer(torch.randn(2, 4, 9, 9)).shape


@FAST
@given(shape=lenet_shapes(), fractions=st.lists(st.floats(0.3, 0.7), min_size=2, max_size=2), seed=st.integers(0, 99))
def test_a_finished_packnet_task_reads_only_the_filter_entries_it_and_earlier_tasks_own(shape, fractions, seed):
    torch.manual_seed(seed)
    net = PackNetCNN.lenet(**shape)
    assume(all(layer.weight.numel() >= 4 for layer in net.hidden))  # room for a second task in every layer
    x = torch.randn(3, *shape["in_shape"])
    for task, fraction in enumerate(fractions):
        if task:
            net.add_task_(torch.Generator().manual_seed(seed + task))
        with torch.no_grad():  # training of the newest task: any change to the free entries
            for layer, free in zip(net.hidden, net.trainable_masks().values(), strict=True):
                layer.weight[free] += torch.randn(int(free.sum()))
        net.prune_(fraction)
    final = outputs(net, x, len(fractions))
    assert net.owner_0.shape == net.hidden[0].weight.shape  # one owner per kernel entry
    with torch.no_grad():
        for task in reversed(range(len(fractions))):  # spoil every entry a task does not own, newest first
            for layer, owner in zip(net.hidden, net.owners(), strict=True):
                layer.weight[(owner > task + 1) | (owner == 0)] = 1e3
            assert torch.equal(net(x, task=task), final[task]), task


@pytest.mark.parametrize("block_type", [PackNetCNN, ProgressiveCNN])
def test_convolutional_blocks_check_their_inputs_and_refuse_another_image_shape(block_type):
    block = block_type.lenet((1, 8, 8), [2], [3], head_classes=2, kernel_size=3, padding=1)
    assert torch.equal(block(torch.ones(2, 64), task=0), block(torch.ones(2, 1, 8, 8), task=0))
    with pytest.raises(ValueError, match=r"expected images of shape \[batch, 1, 8, 8\] or rows of \[batch, 64\]"):
        block(torch.ones(2, 63), task=0)
    other = block_type.lenet((1, 10, 10), [2], [3], head_classes=2, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match=r"reads images of shape \[1, 8, 8\], this one \[1, 10, 10\]"):
        other.rebuild_(block.architecture())


def test_a_convolutional_packnet_checkpoint_is_refused_by_a_fully_connected_one():
    cnn = PackNetCNN.lenet((1, 8, 8), [2], [3], head_classes=2, kernel_size=3, padding=1)
    mlp = PackNetMLP(64, [3], head_classes=2)
    with pytest.raises(ValueError, match="block of type PackNetCNN where this model has one of type PackNetMLP"):
        mlp.load_state_dict(cnn.state_dict(), strict=False)


CONVOLUTIONAL_BLOCKS = [ExpandableCNN, ProgressiveCNN, PackNetCNN]


@pytest.mark.parametrize("block_type", CONVOLUTIONAL_BLOCKS)
@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"convolutions": [nn.Conv2d(1, 2, 3, groups=1, bias=False)]}, "with a bias, groups=1"),
        ({"convolutions": [nn.Conv2d(2, 2, 3)]}, "must read the 1 channels below it"),
        ({"convolutions": []}, "needs at least one convolution"),
        ({"activations": [nn.Sequential(nn.BatchNorm2d(2), nn.Flatten()), nn.ReLU()]}, r"\['BatchNorm2d'\] cannot sit"),
        ({"activations": [nn.ReLU(), nn.ReLU()]}, "must end with nn.Flatten"),
        ({"positions": 10}, "`positions` is 10, but a \\[1, 8, 8\\] image leaves 9 per channel"),
        ({"in_shape": (3, 8, 8)}, r"`in_shape` must be \(1, height, width\)"),
        ({"hidden_sizes": []}, "hidden_sizes"),
    ],
)
def test_convolutional_blocks_refuse_bad_arguments_naming_the_problem(block_type, change, match):
    arguments = dict(
        in_channels=1,
        convolutions=[nn.Conv2d(1, 2, 3)],
        positions=9,
        hidden_sizes=[4],
        head_classes=2,
        activations=[nn.Sequential(nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()), nn.ReLU()],
        in_shape=(1, 8, 8),
    )
    with pytest.raises(ValueError, match=match):
        block_type(**{**arguments, **change})


def test_a_progressive_cnn_refuses_a_lateral_setting_that_is_not_a_bool():
    with pytest.raises(ValueError, match="lateral"):
        ProgressiveCNN.lenet((1, 8, 8), [2], [3], head_classes=2, kernel_size=3, lateral="yes")
