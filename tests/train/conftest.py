import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))



def pytest_configure(config):
    # megatron-core announces each optional accelerator package it does not find.
    config.addinivalue_line("filterwarnings", r"ignore:.*(Transformer Engine|Apex).*not installed")
    config.addinivalue_line("filterwarnings", r"ignore:Apex is not installed")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One dataset cache for the session: the stdlib corpus is built once, outside the repo."""
    return tmp_path_factory.mktemp("dataset-cache")
