"""Shared test fixtures; notebooks run by the tests skip their install cell (ESX_SKIP_INSTALL=1)."""
import os

import jax
import pytest

os.environ.setdefault("ESX_SKIP_INSTALL", "1")   # the notebooks' first cell installs esx-jax unless this is set


@pytest.fixture
def key():
    return jax.random.key(0)
