"""Session fixtures only; the helpers tests import are in tests/helpers.py."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

from helpers import make_experiment
from qwen15_exp.compose import register

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


# MindFormers writes its logs into ./output/log at import unless told where: tests that import it in this
# process (the CPU kernels, generation) must not write into the checkout
_MF_LOGS = tempfile.mkdtemp(prefix="qwen15_exp_tests_mf_")
os.environ.setdefault("LOG_MF_PATH", os.path.join(_MF_LOGS, "log"))
os.environ.setdefault("LOCAL_DEFAULT_PATH", _MF_LOGS)
REPO_ROOT = Path(__file__).resolve().parent.parent
IGNORED_IN_ROOT = {".pytest_cache", ".hypothesis", "__pycache__"}


@pytest.fixture(scope="session", autouse=True)
def _registered():
    register()


@pytest.fixture(scope="session", autouse=True)
def _nothing_written_into_the_checkout():
    """The suite writes only into temporary folders: the checkout's top level is the same after it."""
    before = set(os.listdir(REPO_ROOT))
    yield
    shutil.rmtree(_MF_LOGS, ignore_errors=True)
    added = sorted(set(os.listdir(REPO_ROOT)) - before - IGNORED_IN_ROOT)
    assert not added, f"the test suite wrote into the checkout: {added}"


@pytest.fixture
def experiment():
    return make_experiment
