import os
import sys

# The fused Triton kernels' tests run them in Triton's interpreter on CPU; the variable must be set
# before anything (megatron-core, torch) imports triton. Nothing else runs a Triton kernel on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

if os.environ["TRITON_INTERPRET"] == "1":
    import interpreter_guard  # noqa: E402

    interpreter_guard.install()  # interpreted kernels' loads and stores stay inside their tensors


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.manual_seed(0)
    yield
