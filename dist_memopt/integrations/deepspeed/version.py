"""Which DeepSpeed releases the integration is tested against, and the check made at import.

The adapter reads DeepSpeed internals (``_hp_mapping``, ZeRO-3 sub-groups, the engine's optimizer
set-up); another release may lay those out differently and silently give wrong numbers, so any
other version is refused with a message saying what to install.
"""

from __future__ import annotations

from typing import Optional

from dist_memopt.integrations.versions import UnsupportedVersion, check_version

__all__ = ["SUPPORTED_DEEPSPEED_VERSIONS", "UnsupportedDeepSpeedVersion", "check_deepspeed_version"]

#: Releases whose internals this adapter was checked against (also pinned in pyproject's extra).
SUPPORTED_DEEPSPEED_VERSIONS = ("0.19.8",)


class UnsupportedDeepSpeedVersion(UnsupportedVersion):
    """The installed DeepSpeed is not one the integration was tested against."""


def check_deepspeed_version(installed: Optional[str] = None) -> str:
    """Return the installed DeepSpeed version, or raise :class:`UnsupportedDeepSpeedVersion`.

    ``installed`` defaults to ``deepspeed.__version__``; passing it lets tests check the refusal
    without touching DeepSpeed.
    """
    if installed is None:
        import deepspeed

        installed = deepspeed.__version__
    return check_version("DeepSpeed", installed, SUPPORTED_DEEPSPEED_VERSIONS, "DeepSpeed's partition layout",
                         "deepspeed", UnsupportedDeepSpeedVersion)
