"""Checkpoints of grown networks: the architecture travels as plain data and is rebuilt before loading."""

from __future__ import annotations

import pytest
import torch

from lightning_den import DENMLP, DENCallback
from tests.helpers import IN_FEATURES, make_trainer, short_phases, tiny_model, tiny_stream


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    model = tiny_model()
    trainer = make_trainer(folder, [DENCallback(**short_phases(loss_threshold=0.0))])
    trainer.fit(model, datamodule=tiny_stream(num_tasks=3))
    path = folder / "grown.ckpt"
    trainer.save_checkpoint(path)
    return model, path


def test_load_from_checkpoint_rebuilds_the_grown_network_bit_for_bit(grown):
    model, path = grown
    assert model.mlp.hidden[0].out_features > 5  # it did grow
    checkpoint = torch.load(path, weights_only=True)  # plain data only
    saved = checkpoint["state_dict"]["mlp._extra_state"]  # the architecture travels with the block's weights
    assert saved["active_task"] == 2 and saved["tasks_learned"] == 3 and len(saved["architecture"]["heads"]) == 3
    restored = DENMLP.load_from_checkpoint(path, optimizer=torch.optim.Adam)
    assert restored.current_task == 2
    x = torch.randn(11, IN_FEATURES)
    model.eval()
    restored.eval()
    with torch.no_grad():
        for task in range(3):
            assert restored.mlp.widths(task) == model.mlp.widths(task)
            assert torch.equal(restored(x, task=task), model(x, task=task))


def test_a_checkpoint_of_another_architecture_is_refused_with_the_reason(grown):
    _, path = grown
    with pytest.raises(ValueError, match="input width 6 and 2 hidden layers, this one 6 and 3"):
        DENMLP.load_from_checkpoint(path, hidden_sizes=[5, 4, 3], optimizer=torch.optim.Adam)

    class Renamed(DENMLP):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.trunk = self.mlp
            del self.mlp

    with pytest.raises(RuntimeError, match=r'(?s)Missing key\(s\) in state_dict: "trunk\._extra_state".*Unexpected'):
        Renamed.load_from_checkpoint(path, optimizer=torch.optim.Adam)
