"""DEN's whole per-task pipeline without a Trainer: :class:`~lightning_den.core.den.DENMethod` stepped by hand.

A plain training loop plays the driver's part (trainable entries, gradient masks, write-back of frozen
entries); what each phase may change is then checked bit for bit, and a property test checks that no
proximal step ever changes an entry its phase does not train.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_den.core.den import DENMethod, DENPhase, ExpandableMLP, drift_targets, proximal_targets
from lightning_den.core.den.entries import (
    parameter_entries,
    separate_trained_entries_,
    trainable_entries,
)
from lightning_den.core.den.prox import group_lasso_prox_
from lightning_den.core.den.selection import select_subnetwork
from lightning_den.core.den.surgery import snapshot
from lightning_den.core.freezing import FrozenEntries
from lightning_den.core.method import PhaseProgress, TaskBlock, phase_is_done
from tests.core.helpers import FAST, as_mask, build, mlp_configs, random_history

IN_FEATURES, HIDDEN, TASKS = 6, [8, 6], 3


def tasks(seed: int = 0, size: int = 64) -> list[tuple[Tensor, Tensor]]:
    """Binary tasks on random inputs; task ``t`` depends on the first ``t + 2`` input features only."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for task in range(TASKS):
        x = torch.randn(size, IN_FEATURES, generator=generator)
        direction = torch.zeros(IN_FEATURES)
        direction[: task + 2] = torch.randn(task + 2, generator=generator)
        result.append((x, (x @ direction > 0).long()))
    return result


def train_phase(method: DENMethod, mlp: ExpandableMLP, progress: PhaseProgress, data) -> float:
    """One epoch of ``progress``'s phase in full batches of 16, as the driver runs it; the mean loss."""
    method.arrange(mlp, progress)
    trainable = method.trainable(mlp, progress)
    masks = {}
    for p, entries in trainable.items():
        p.requires_grad_(entries is not False)
        if isinstance(entries, Tensor):
            masks[p] = entries
    frozen = FrozenEntries(masks)
    method.enter_phase(mlp, progress, trainable)
    optimizer = torch.optim.Adam([p for p in mlp.parameters() if p.requires_grad], lr=0.05)
    x, y = data
    losses = []
    for start in range(0, len(y), 16):
        optimizer.zero_grad()
        loss = F.cross_entropy(mlp(x[start : start + 16], progress.task), y[start : start + 16])
        loss.backward()
        method.before_step(mlp, mlp, optimizer)
        frozen.mask_gradients_()
        kept = {p: p.detach()[~mask].clone() for p, mask in masks.items()}
        optimizer.step()
        method.after_step(mlp, optimizer)
        for p, mask in masks.items():  # before the write-back: neither Adam nor a proximal step moved them
            assert torch.equal(p.detach()[~mask], kept[p]), "a frozen entry changed before the write-back"
        frozen.restore_()
        losses.append(float(loss.detach()))
    return sum(losses) / len(losses)


def run_sequence(method: DENMethod, mlp: ExpandableMLP, check_phase, check_surgery=None) -> list[tuple[int, DENPhase]]:
    """The whole sequence: ``check_phase(progress, before, after)`` sees the state around every phase, and
    ``check_surgery(target, plan, widths_before)`` every surgery."""
    data, progress, visited = tasks(), method.start(), []
    while progress is not None:
        visited.append((progress.task, progress.phase))
        before = {name: p.detach().clone() for name, p in mlp.named_parameters()}
        while True:
            mean_loss = train_phase(method, mlp, progress, data[progress.task])
            progress = PhaseProgress(progress.task, progress.phase, progress.epochs + 1, progress.last_loss)
            done = phase_is_done(progress, method.phase_epochs(progress.phase), mean_loss, 0.0)
            progress.last_loss = mean_loss
            if done:
                break
        check_phase(progress, before, dict(mlp.named_parameters()))
        target = method.following_phase(progress, mean_loss, TASKS)
        if target is None:
            method.apply_end(mlp, method.end_plan(mlp, progress))
        else:
            plan, widths = method.plan(mlp, progress, target, TASKS), [layer.out_features for layer in mlp.hidden]
            method.apply(mlp, progress, target, plan)
            if check_surgery is not None:
                check_surgery(target, plan, widths)
        progress = target
    return visited


def den(**changes) -> DENMethod:
    settings = dict(
        first_task_epochs=3,
        head_fit_epochs=2,
        selective_epochs=2,
        expansion_epochs=2,
        split_epochs=2,
        sparsity_l1=0.05,
        loss_threshold=0.0,
        units_per_expansion=3,
        selection_budget=0.5,
    )
    return DENMethod(**{**settings, **changes})


def test_the_pipeline_runs_every_phase_and_changes_only_what_each_phase_trains():
    torch.manual_seed(0)
    mlp, method = ExpandableMLP(IN_FEATURES, HIDDEN, head_classes=2), den()
    selected_fractions, sparse_zeros = [], []

    def check_phase(progress, before, after):
        task, phase = progress.task, progress.phase
        for name, value in before.items():
            if name.startswith("heads.") and name.split(".")[1] != str(task):
                assert torch.equal(after[name], value), f"{phase}: the head of an earlier task changed ({name})"
        if phase is DENPhase.SPARSE:  # no surgery yet: every exact zero comes from the L1 step
            sparse_zeros.extend(int((after[f"hidden.{i}.weight"] == 0).sum()) for i in range(len(HIDDEN)))
        if phase is DENPhase.HEAD_FIT:
            for name, value in before.items():
                if name.startswith("hidden."):
                    assert torch.equal(after[name], value), f"head fit changed {name}"
        if phase is DENPhase.SELECTIVE:
            selection = method.state_dict()["selection"]
            selected_fractions.append(method.state_dict()["selected_fraction"])
            for index in range(len(HIDDEN)):
                rows, cols = selection[index + 1], selection[index]
                for name in ("weight", "bias"):
                    key = f"hidden.{index}.{name}"
                    kept = torch.ones_like(before[key], dtype=torch.bool)
                    if name == "weight":
                        kept[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = False
                    else:
                        kept[rows] = False
                    assert torch.equal(after[key][kept], before[key][kept]), f"a non-selected entry of {key} changed"
        if phase is DENPhase.EXPANSION:
            for index, layer in enumerate(mlp.hidden):
                old_rows = int((layer.birth < task).sum())
                old_cols = IN_FEATURES if index == 0 else int((mlp.hidden[index - 1].birth < task).sum())
                key = f"hidden.{index}.weight"
                assert torch.equal(after[key][:old_rows, :old_cols], before[key][:old_rows, :old_cols])

    surgeries = []

    def check_surgery(target, plan, widths):
        grown = [layer.out_features - before for layer, before in zip(mlp.hidden, widths, strict=True)]
        added, pruned, split = plan.get("added"), plan.get("pruned"), plan.get("split")
        expected = [
            (added[i] if added else 0) - (len(pruned[i]) if pruned else 0) + (len(split[i]) if split else 0)
            for i in range(len(widths))
        ]
        assert grown == expected, f"{target.phase}: widths changed by {grown}, the plan says {expected}"
        if split:  # the originals are back at W^{t-1}; the copies hold the drifted weights
            reference = method.state_dict()["snapshot"]
            for i, units in enumerate(split):
                saved = reference[f"hidden.{i}.weight"]
                for unit in units:
                    assert torch.equal(mlp.hidden[i].weight[unit, : saved.shape[1]], saved[unit])
        surgeries.append((target.phase, plan))

    visited = run_sequence(method, mlp, check_phase, check_surgery)
    assert any("added" in plan for _, plan in surgeries) and any(plan.get("split") for _, plan in surgeries)
    assert sum(sparse_zeros) > 0, "L1 left no exact zero in the first task"
    assert visited == [
        (0, DENPhase.SPARSE),
        *[(t, p) for t in (1, 2) for p in (DENPhase.HEAD_FIT, DENPhase.SELECTIVE, DENPhase.EXPANSION, DENPhase.SPLIT)],
    ]
    assert all(fraction <= 0.5 + 1e-9 for fractions in selected_fractions for fraction in fractions)
    assert mlp.num_tasks == TASKS and all(
        layer.out_features >= size for layer, size in zip(mlp.hidden, HIDDEN, strict=True)
    )
    mlp.check_prefix_invariant()


def test_a_reloaded_method_plans_the_same_split():
    torch.manual_seed(0)
    mlp, method = ExpandableMLP(IN_FEATURES, HIDDEN, head_classes=2), den(split_threshold=0.0)
    progress = method.start()
    target = method.following_phase(progress, math.inf, TASKS)
    method.apply(mlp, progress, target, method.plan(mlp, progress, target, TASKS))  # W^{t-1} is kept
    with torch.no_grad():
        for layer in mlp.hidden:
            layer.weight.add_(torch.randn_like(layer.weight))  # every unit drifts
    split = PhaseProgress(task=1, phase=DENPhase.SPLIT)
    selective = PhaseProgress(task=1, phase=DENPhase.SELECTIVE)
    planned = method.plan(mlp, selective, split, TASKS)["split"]
    assert all(planned)
    reloaded = den(split_threshold=0.0)
    reloaded.load_state_dict(method.state_dict())
    assert reloaded.plan(mlp, selective, split, TASKS)["split"] == planned
    with pytest.raises(KeyError):  # the split is measured against W^{t-1}, which travels in the state
        den(split_threshold=0.0).plan(mlp, selective, split, TASKS)


def test_the_blocks_follow_the_task_block_protocol():
    from lightning_den.core.packnet import PackNetMLP
    from lightning_den.core.progressive import ProgressiveMLP

    for block in (ExpandableMLP(3, [2], 2), ProgressiveMLP(3, [2], 2), PackNetMLP(3, [2], 2)):
        assert isinstance(block, TaskBlock)
    assert not isinstance(nn.Linear(3, 2), TaskBlock)


@FAST
@given(config=mlp_configs(), data=st.data())
def test_no_proximal_step_changes_an_entry_its_phase_does_not_train(config, data):
    mlp, generator = build(config)
    random_history(data, mlp, generator)
    phase = data.draw(st.sampled_from(list(DENPhase)), label="phase")
    selection = select_subnetwork(mlp, mlp.newest_task, data.draw(st.sampled_from([None, 0.5]), label="budget"))
    trainable = trainable_entries(mlp, phase, selection)  # by weight and bias
    before = {name: mlp.get_parameter(name).detach().clone() for name in trainable}
    if phase is DENPhase.SELECTIVE:  # each phase's layout: every trained entry in a Parameter that trains whole
        mlp.gather_(selection)
    elif phase is DENPhase.EXPANSION:
        separate_trained_entries_(mlp, trainable)
    by_parameter = parameter_entries(mlp, trainable)
    laid_out = {name: by_parameter[p] for name, p in mlp.named_parameters()}
    l1, group = data.draw(st.floats(0.0, 2.0), label="l1"), data.draw(st.floats(0.0, 2.0), label="group")
    with torch.no_grad():
        for target in proximal_targets(mlp, laid_out, phase).values():
            target.step_(l1, group)
    mlp.join_()
    for name, trained in trainable.items():
        p = mlp.get_parameter(name)
        frozen = ~as_mask(trained, p.shape)
        assert torch.equal(p.detach()[frozen], before[name][frozen]), f"{phase}: a frozen entry of {name} changed"


def test_proximal_targets_refuse_a_weight_that_trains_only_some_entries():
    mlp = ExpandableMLP(4, [3], head_classes=2)
    mlp.add_task_()
    entries = trainable_entries(mlp, DENPhase.SELECTIVE, [[0, 1], [2]])  # masks: the block is not gathered
    with pytest.raises(ValueError, match=r"heads\.1\.weight trains only some of its entries in selective"):
        proximal_targets(mlp, entries, DENPhase.SELECTIVE)


@FAST
@given(config=mlp_configs(), data=st.data())
def test_group_lasso_acts_only_on_units_born_in_the_newest_task(config, data):
    mlp, generator = build(config)
    random_history(data, mlp, generator)
    method = DENMethod()
    method.arrange(mlp, PhaseProgress(task=mlp.newest_task, phase=DENPhase.EXPANSION))
    trainable = method.trainable(mlp, PhaseProgress(task=mlp.newest_task, phase=DENPhase.EXPANSION))
    laid_out = {name: trainable[p] for name, p in mlp.named_parameters()}
    grouped = set()
    for param, target in proximal_targets(mlp, laid_out, DENPhase.EXPANSION).items():
        if target.new_rows is None:
            continue
        layer = next(layer for layer in mlp.hidden if getattr(layer, "new_unit_weight", None) is param)
        born = int((layer.birth == mlp.newest_task).sum())
        assert target.new_rows.shape[0] == born and target.new_biases.shape[0] == born
        # the separated Parameter holds the new units' rows of the layer's weight, which follows it (sync_)
        assert target.new_rows.data_ptr() == param.data_ptr()
        assert torch.equal(target.new_rows, layer.weight[layer.out_features - born :])
        grouped.add(id(layer))
    newborn = {id(layer) for layer in mlp.hidden if bool((layer.birth == mlp.newest_task).any())}
    assert grouped == newborn  # every layer with new units, and only those


@pytest.mark.parametrize("phase", list(DENPhase))
def test_the_pull_toward_the_previous_task_acts_in_selective_retraining_and_after_the_split(phase):
    mlp = ExpandableMLP(4, [3, 2], head_classes=2)
    targets = drift_targets(mlp, phase, snapshot(mlp))
    assert bool(targets) == (phase in (DENPhase.SELECTIVE, DENPhase.SPLIT))
    assert all(target.values.shape == target.reference.shape for target in targets)


def test_with_several_optimizers_each_parameter_gets_the_pull_once():
    torch.manual_seed(0)
    mlp, method = ExpandableMLP(IN_FEATURES, HIDDEN, head_classes=2), den(drift_penalty=3.0)
    method.load_state_dict({"snapshot": snapshot(mlp)})
    mlp.add_task_()
    with torch.no_grad():
        for p in mlp.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from W^{t-1}, so that the pull is not zero
    progress = PhaseProgress(task=1, phase=DENPhase.SPLIT)
    method.arrange(mlp, progress)
    trainable = method.trainable(mlp, progress)
    method.enter_phase(mlp, progress, trainable)
    x, y = tasks()[1]
    F.cross_entropy(mlp(x, 1), y).backward()
    params = [p for p in mlp.parameters() if p.grad is not None]
    raw = [p.grad.clone() for p in params]

    method.before_step(mlp, mlp, torch.optim.SGD(params, lr=0.1))  # one optimizer over everything
    one = [p.grad.clone() for p in params]
    for p, grad in zip(params, raw, strict=True):
        p.grad.copy_(grad)
    first, second = torch.optim.SGD(params[:2], lr=0.1), torch.optim.SGD(params[2:], lr=0.1)
    method.before_step(mlp, mlp, first)  # as manual optimization steps them, one after the other
    method.before_step(mlp, mlp, second)
    assert all(torch.equal(p.grad, grad) for p, grad in zip(params, one, strict=True))
    assert not all(torch.equal(got, grad) for got, grad in zip(one, raw, strict=True))  # the pull acted


def masked_dense_reference(block: ExpandableMLP, phase: DENPhase, selection, method: DENMethod, fused: bool):
    """The phase as it ran before its trained entries got Parameters of their own: a dense Adam step under
    gradient masks, the pull toward W^{t-1} on the whole old block, masked L1 and group lasso on the new
    rows, the frozen entries written back. Returns one step of it, to run after the backward."""
    entries = trainable_entries(block, phase, selection)
    params = dict(block.named_parameters())
    for name, p in params.items():
        p.requires_grad_(entries[name] is not False)
    frozen = FrozenEntries({params[n]: m for n, m in entries.items() if isinstance(m, Tensor)})
    pulled = drift_targets(block, phase, method.state_dict()["snapshot"])
    optimizer = torch.optim.Adam([p for p in block.parameters() if p.requires_grad], lr=0.05, fused=fused)
    threshold = 0.05 * method.sparsity_l1

    @torch.no_grad()
    def step() -> None:
        for target in pulled:
            target.grad().add_(target.values - target.reference, alpha=2.0 * method.drift_penalty)
        frozen.mask_gradients_()
        optimizer.step()
        for name, trained in entries.items():
            if not name.endswith("weight") or trained is False:
                continue
            weight = params[name].detach()
            mask = torch.ones_like(weight) if trained is True else trained.to(weight.dtype)
            weight.sub_(weight.clamp(-threshold, threshold).mul_(mask))
            layer = block.get_submodule(name.rpartition(".")[0])
            if phase is DENPhase.EXPANSION and name.startswith("hidden."):
                first = int((layer.birth < 1).sum())
                group_lasso_prox_([weight[first:]], 0.05 * method.group_sparsity, [layer.bias.detach()[first:]])
        frozen.restore_()

    return optimizer, step


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("phase", [DENPhase.SELECTIVE, DENPhase.EXPANSION])
def test_a_phase_on_its_own_parameters_is_the_masked_dense_step(phase, fused):
    """Selective retraining on the gathered subnetwork (cut short by a budget, so the rest takes part frozen) and
    expansion on the new units' Parameters step as the masked dense phases did, regularisers included: every
    frozen entry bit for bit, the trained ones to float rounding."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = ExpandableMLP(IN_FEATURES, [7, 5], head_classes=3)
    method = DENMethod(selection_budget=0.5, drift_penalty=0.5, units_per_expansion=[2, 3])
    head_fit, progress = PhaseProgress(task=1, phase=DENPhase.HEAD_FIT), PhaseProgress(task=1, phase=phase)
    method.apply(mlp, method.start(), head_fit, method.plan(mlp, method.start(), head_fit, 2))  # W^0, new head
    plan = method.plan(mlp, head_fit, progress, 2)
    method.apply(mlp, head_fit, progress, plan)
    with torch.no_grad():  # W^0 and the weights now differ, so that the pull acts
        for p in mlp.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    reference = copy.deepcopy(mlp)
    reference_optimizer, reference_step = masked_dense_reference(reference, phase, plan.get("selection"), method, fused)

    method.arrange(mlp, progress)
    trainable = method.trainable(mlp, progress)
    assert not any(isinstance(entries, Tensor) for entries in trainable.values())  # no mask is left
    for p, entries in trainable.items():
        p.requires_grad_(entries is not False)
    method.enter_phase(mlp, progress, trainable)
    optimizer = torch.optim.Adam([p for p in mlp.parameters() if p.requires_grad], lr=0.05, fused=fused)

    x, y = torch.randn(32, IN_FEATURES, generator=generator), torch.randint(0, 3, (32,), generator=generator)
    before = reference.state_dict()
    before = {name: value.clone() for name, value in before.items() if isinstance(value, Tensor)}
    for _ in range(5):
        for model, step in ((mlp, optimizer), (reference, reference_optimizer)):
            step.zero_grad()
            F.cross_entropy(model(x, task=1), y).backward()
        method.before_step(mlp, mlp, optimizer)
        optimizer.step()
        method.after_step(mlp, optimizer)
        reference_step()
    gathered, plain = mlp.state_dict(), reference.state_dict()
    assert gathered.keys() == plain.keys()
    entries = trainable_entries(reference, phase, plan.get("selection"))
    for name in plain:
        if not isinstance(plain[name], Tensor):
            continue
        frozen = ~as_mask(entries.get(name, False), plain[name].shape)
        assert torch.equal(gathered[name][frozen], before[name][frozen]), f"a frozen entry of {name} changed"
        # the trained entries to float rounding: a gradient formed on its own block is a GEMM of another shape,
        # which some CPUs sum in another order (seen: 1 ulp on an AVX-512 AMD EPYC), and torch's fused CPU Adam
        # rounds an entry's update by where it lies in its tensor
        torch.testing.assert_close(gathered[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(plain["hidden.0.weight"], before["hidden.0.weight"])  # and the phase did train
