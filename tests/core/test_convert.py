"""Converting a user's chain of ``nn.Linear`` layers into each method's block: bit-identical function, clear
refusals, and a grown block's state loading back into a freshly built user model."""

from __future__ import annotations

import io
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightning_den.core.convert import attach_block, load_grown
from lightning_den.core.den import ExpandableMLP
from lightning_den.core.packnet import PackNetMLP
from lightning_den.core.progressive import ProgressiveMLP
from lightning_den.core.routing import task
from tests.core.helpers import FAST

BLOCKS = [ExpandableMLP, ProgressiveMLP, PackNetMLP]
BETWEEN = [nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.LeakyReLU, nn.SiLU, lambda: nn.Dropout(0.3), nn.Identity]


class UserModel(nn.Module):
    """A user's model: a chain of Linear layers named ``net`` after a fixed scaling, ``forward(x)`` only."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((1,), 0.5))
        self.net = net

    def forward(self, x):
        return self.net(x * self.scale)


@st.composite
def chains(draw) -> nn.Sequential:
    widths = draw(st.lists(st.integers(1, 6), min_size=3, max_size=5), label="widths")  # two Linear layers or more
    torch.manual_seed(draw(st.integers(0, 2**16), label="seed"))
    modules: list[nn.Module] = []
    for index, (a, b) in enumerate(itertools.pairwise(widths)):
        modules.append(nn.Linear(a, b))
        if index < len(widths) - 2:
            for make in draw(st.lists(st.sampled_from(BETWEEN), min_size=1, max_size=2), label="between"):
                modules.append(make())
    return nn.Sequential(*modules)


@FAST
@given(chain=chains(), block_type=st.sampled_from(BLOCKS), training=st.booleans())
def test_the_converted_model_computes_bit_for_bit_what_the_users_model_computed(chain, block_type, training):
    model = UserModel(chain).train(training)
    x = torch.randn(7, chain[0].in_features)
    torch.manual_seed(1)  # the same dropout masks on both sides
    expected = model(x)
    name, block = attach_block(model, block_type)
    torch.manual_seed(1)
    assert name == "net" and model.net is block and isinstance(block, block_type)
    assert torch.equal(model(x), expected)


def test_the_global_random_stream_is_left_as_it_was():
    torch.manual_seed(3)
    model = UserModel(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    state = torch.random.get_rng_state()
    attach_block(model, ExpandableMLP)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(
    ("net", "name", "match"),
    [
        (nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2)), None, r"`net\.1` is a LayerNorm"),
        (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2, bias=False)), None, r"`net\.2` has no bias"),
        (nn.Sequential(nn.ReLU(), nn.Linear(4, 3), nn.Linear(3, 2)), "net", "must start with an nn.Linear"),
        (nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), "missing", r"`block='missing'` is not a mod"),
    ],
)
def test_what_cannot_be_converted_is_refused_naming_the_module_and_the_fix(net, name, match):
    with pytest.raises(ValueError, match=match):
        attach_block(UserModel(net), ExpandableMLP, name)


def test_several_chains_need_a_name():
    model = nn.Module()
    model.encoder = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3))
    model.decoder = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"several nn\.Sequential chains of Linear layers \['decoder', 'encoder'\]"):
        attach_block(model, ExpandableMLP)
    assert attach_block(model, ExpandableMLP, "decoder")[0] == "decoder"
    assert isinstance(model.encoder, nn.Sequential)


def test_a_layer_shared_with_another_part_of_the_model_is_refused():
    model = UserModel(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    model.probe = model.net[0]
    with pytest.raises(ValueError, match="also registered elsewhere"):
        attach_block(model, ExpandableMLP)


def fully_connected() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))


def convolutional() -> nn.Sequential:  # reads [batch, 4] as [batch, 1, 2, 2]
    return nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 3, 2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(27, 5), nn.Tanh(), nn.Linear(5, 2))  # fmt: skip


class UserConvModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chain = convolutional()
        self.unflatten, self.net = chain[0], nn.Sequential(*chain[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.unflatten(x))


@pytest.mark.parametrize("convolutions", [False, True])
@pytest.mark.parametrize(("block_type", "options"), [*((b, {}) for b in BLOCKS), (ProgressiveMLP, {"lateral": False})])
def test_a_grown_blocks_state_loads_into_a_freshly_built_user_model(block_type, options, convolutions):
    torch.manual_seed(0)
    build = UserConvModel if convolutions else lambda: UserModel(fully_connected())
    model = build()
    _, block = attach_block(model, block_type, options=options)
    if isinstance(block, PackNetMLP):
        block.prune_(0.5)
    block.add_task_(torch.Generator().manual_seed(1))
    block.active_task, block.tasks_learned = 1, 1
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict()}, buffer)
    buffer.seek(0)
    restored = load_grown(build(), buffer)  # built as the method built it: options included
    assert type(restored.net) is type(block) and restored.net.architecture() == block.architecture()
    x = torch.randn(3, 4)
    for t in (0, 1):
        with task(model, t), task(restored, t):
            assert torch.equal(restored(x), model(x))
    assert restored.net.active_task == 1 and restored.net.tasks_learned == 1


def test_task_routes_every_call_and_restores_the_active_task():
    mlp = ExpandableMLP(4, [3], head_classes=[2, 5])
    mlp.add_task_()
    mlp.active_task = 1
    with task(mlp, 0):
        assert mlp(torch.zeros(1, 4)).shape == (1, 2)
    assert mlp(torch.zeros(1, 4)).shape == (1, 5)
    with pytest.raises(ValueError, match="task 2 was never trained"), task(mlp, 2):
        pass
    with pytest.raises(ValueError, match="no task block"), task(nn.Linear(2, 2), 0):
        pass


def test_a_compiled_converted_model_follows_the_active_task():
    model = UserModel(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)))
    attach_block(model, ExpandableMLP)
    model.net.add_task_(torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="aot_eager")  # graph capture only: no C++ toolchain needed
    x = torch.randn(3, 4)
    for t in (0, 1, 0):  # the active task is a plain attribute: a guard, so a switch recompiles or reuses
        with task(model, t):
            assert torch.equal(compiled(x), model(x)), t


# --- chains that start with convolutions (each method's convolutional block) ---

CHANNELWISE_BETWEEN = [nn.ReLU, nn.Tanh, lambda: nn.Dropout(0.3), lambda: nn.MaxPool2d(2), lambda: nn.AvgPool2d(2)]


def fits(modules: list[nn.Module], candidate: nn.Module, probe: torch.Tensor) -> bool:
    """Whether ``candidate`` after ``modules`` still leaves at least one position of the probe image."""
    try:
        return nn.Sequential(*modules, candidate).eval()(probe).shape[-1] >= 1
    except RuntimeError:  # the feature map is already smaller than the candidate's kernel
        return False


@st.composite
def conv_chains(draw) -> tuple[nn.Sequential, tuple[int, int, int]]:
    """A user's ``nn.Sequential``: convolutions (random kernels, strides, padding, dilation) with channelwise modules
    between them, one ``nn.Flatten``, then Linear layers; and the image shape it reads."""
    channels = draw(st.integers(1, 3), label="in channels")
    side = draw(st.integers(8, 12), label="side")
    torch.manual_seed(draw(st.integers(0, 2**16), label="seed"))
    modules: list[nn.Module] = []
    below = channels
    probe = torch.zeros(1, channels, side, side)
    for index in range(draw(st.integers(1, 2), label="convolutions")):
        width, kernel = draw(st.integers(1, 4), label="filters"), draw(st.integers(1, 3), label="kernel")
        stride, padding = draw(st.integers(1, 2), label="stride"), draw(st.integers(0, 1), label="padding")
        dilation = draw(st.integers(1, 2), label="dilation")
        convolution = nn.Conv2d(below, width, kernel, stride=stride, padding=padding, dilation=dilation)
        if index and not fits(modules, convolution, probe):
            break
        modules.append(convolution)
        for make in draw(st.lists(st.sampled_from(CHANNELWISE_BETWEEN), max_size=2), label="between"):
            candidate = make()
            if fits(modules, candidate, probe):
                modules.append(candidate)
        below = width
    modules.append(nn.Flatten())
    features = nn.Sequential(*modules)(probe).shape[1]
    hidden = draw(st.lists(st.integers(1, 5), min_size=1, max_size=2), label="hidden")
    for a, b in itertools.pairwise([features, *hidden]):
        modules += [nn.Linear(a, b), draw(st.sampled_from(BETWEEN), label="after linear")()]
    modules.append(nn.Linear(hidden[-1], draw(st.integers(1, 3), label="classes")))
    return nn.Sequential(*modules), (channels, side, side)


@FAST
@given(configured=conv_chains(), training=st.booleans(), block_type=st.sampled_from(BLOCKS))
def test_a_chain_of_convolutions_converts_into_each_methods_cnn_bit_for_bit(configured, training, block_type):
    from lightning_den.core.convert import _convolutional_sibling

    chain, shape = configured
    model = UserModel(chain).train(training)
    x = torch.randn(5, *shape)
    torch.manual_seed(1)  # the same dropout masks on both sides
    expected = model(x)
    _, block = attach_block(model, block_type)  # the method's block type: a chain of convolutions becomes its CNN
    torch.manual_seed(1)
    assert isinstance(block, _convolutional_sibling(block_type)) and model.net is block
    assert torch.equal(model(x), expected)
    hidden, _ = block.first_task_layers()
    filters = [layer.weight.shape[0] for layer in hidden if layer.weight.ndim == 4]
    assert filters == [m.out_channels for m in chain if isinstance(m, nn.Conv2d)]


@FAST
@given(configured=conv_chains(), lateral=st.booleans())
def test_a_converted_progressive_cnn_grows_columns_that_leave_task_0_bit_for_bit(configured, lateral):
    chain, shape = configured
    model = UserModel(chain).eval()
    x = torch.randn(4, *shape)
    _, block = attach_block(model, ProgressiveMLP, options={"lateral": lateral})
    with torch.no_grad():
        before = block(x, task=0)
        for task_id in (1, 2):
            block.add_task_(torch.Generator().manual_seed(task_id))
            for parameter in block.column_parameters(task_id):
                parameter.add_(torch.randn_like(parameter))
            assert block(x, task=task_id).shape == before.shape  # laterals fit strides, padding, dilation
        assert torch.equal(block(x, task=0), before)


def test_a_block_type_without_a_convolutional_form_refuses_a_chain_of_convolutions_naming_those_with_one():
    class FullyConnectedOnly(ExpandableMLP):  # a third-party method's block, with no CNN sibling
        pass

    chain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"a FullyConnectedOnly grows fully connected layers only.*PackNet"):
        attach_block(UserModel(chain), FullyConnectedOnly)


@pytest.mark.parametrize(
    ("net", "match"),
    [
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)),
            "needs one nn.Flatten",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(7, 4), nn.ReLU(), nn.Linear(4, 2)),
            "reads 7 features, which is not a whole number of positions per channel",
        ),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)), "hold at least two Linears"),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 4), nn.Linear(4, 2)),
            r"`net\.1` is a BatchNorm2d",
        ),
        (
            nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.Flatten(), nn.Linear(8, 4), nn.Linear(4, 2)),
            r"`net\.0` has no bias",
        ),
    ],
)
def test_a_chain_of_convolutions_that_cannot_grow_is_refused_naming_the_problem(net, match):
    with pytest.raises(ValueError, match=match):
        attach_block(UserModel(net), ExpandableMLP, "net")
