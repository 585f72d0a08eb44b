"""DeepSpeed integration: ``"optimizer": {"type": "SMMF" | "Alada"}`` in ds_config, exact on ZeRO 0–3.

Importing this package checks the DeepSpeed version (see :mod:`.version`) and calls
:func:`~.hooks.install`, the single, idempotent place where DeepSpeed learns our optimizer names
and where each parameter's fragment lies in the tensors ZeRO steps. After that a plain
``deepspeed.initialize(model=..., model_parameters=..., config=...)`` works, as does passing
``optimizer=SMMF(model.parameters(), ...)``; ``zero_allow_untested_optimizer`` is not needed.

With the ``deepspeed``/``torchrun`` launchers, let every rank import it before building the
engine: either ``import dist_memopt.integrations.deepspeed`` in the training script, or launch the
unchanged script through :mod:`.run` (``deepspeed --module dist_memopt.integrations.deepspeed.run
train.py ...``, or the ``dist-memopt-deepspeed`` console script).

Non-finite gradients: DeepSpeed checks for overflow before it calls the optimizer and skips the
step (fp16 always, bf16 with ``check_grad_overflow`` (default), fp32 ZeRO through its invalid-norm
check), so the optimizers' own ``check_finite`` never fires under it and the skipped step leaves
their state untouched. It stays on as a safety net where DeepSpeed would step on inf/NaN (bf16
with ``check_grad_overflow: false``, stage 0 fp32): it then raises ``NonFiniteGradientError``
before that call changes anything (with several param groups ZeRO 1/2 step them one by one, so
groups stepped earlier in that step have moved). ``"check_finite": false`` in the optimizer's
``params`` drops the redundant pass over the gradients.
"""

from dist_memopt.integrations.deepspeed.version import (
    SUPPORTED_DEEPSPEED_VERSIONS,
    UnsupportedDeepSpeedVersion,
    check_deepspeed_version,
)

check_deepspeed_version()

from dist_memopt.integrations.deepspeed.hooks import attach, install, installed  # noqa: E402
from dist_memopt.integrations.deepspeed.layouts import PartitionLayout, describe_partitions  # noqa: E402
from dist_memopt.integrations.deepspeed.registry import OPTIMIZERS, build_optimizer  # noqa: E402

install()

__all__ = [
    "SUPPORTED_DEEPSPEED_VERSIONS",
    "UnsupportedDeepSpeedVersion",
    "check_deepspeed_version",
    "install",
    "installed",
    "attach",
    "describe_partitions",
    "PartitionLayout",
    "OPTIMIZERS",
    "build_optimizer",
]
