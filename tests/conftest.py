"""Shared fixtures: the real models (pulled into the model cache on first use) and the oracle."""
from __future__ import annotations

import os

import pytest

from ggufrun import hub


def _pull(name: str):
    try:
        return hub.resolve(name, quiet=True)
    except hub.PullError as e:  # no registry access: the parity tests cannot run, say so loudly
        pytest.fail(f"cannot pull {name}: {e}")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return str(_pull("smollm2-135m"))


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    return str(_pull("gemma3-270m"))
