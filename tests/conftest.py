"""Fixtures of the test suite: every test starts from the same global seed."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest


@pytest.fixture(autouse=True)
def _seed():
    pl.seed_everything(0, verbose=False)
