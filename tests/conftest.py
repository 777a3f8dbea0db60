"""Session fixtures only; the helpers tests import are in tests/helpers.py."""
from __future__ import annotations

import os

import pytest
from hypothesis import settings

from helpers import make_experiment
from qwen15_exp.compose import register

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session", autouse=True)
def _registered():
    register()


@pytest.fixture
def experiment():
    return make_experiment
