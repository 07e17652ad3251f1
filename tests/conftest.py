"""Shared test set-up: import labkit first so TensorFlow/gym start-up noise stays silent."""

import labkit  # noqa: F401
import numpy as np
import pytest


@pytest.fixture
def rng():
    """A seeded numpy generator, fresh per test."""
    return np.random.default_rng(0)
