"""Which DeepSpeed releases the integration is tested against, and the check made at import.

The adapter reads DeepSpeed internals (``_hp_mapping``, ZeRO-3 sub-groups, the engine's optimizer
set-up); another release may lay those out differently and silently give wrong numbers, so any
other version is refused with a message saying what to install.
"""

from __future__ import annotations

from typing import Optional

from packaging.version import InvalidVersion, Version

__all__ = ["SUPPORTED_DEEPSPEED_VERSIONS", "UnsupportedDeepSpeedVersion", "check_deepspeed_version"]

#: Releases whose internals this adapter was checked against (also pinned in pyproject's extra).
SUPPORTED_DEEPSPEED_VERSIONS = ("0.19.8",)


class UnsupportedDeepSpeedVersion(ImportError):
    """The installed DeepSpeed is not one the integration was tested against."""


def check_deepspeed_version(installed: Optional[str] = None) -> str:
    """Return the installed DeepSpeed version, or raise :class:`UnsupportedDeepSpeedVersion`.

    ``installed`` defaults to ``deepspeed.__version__``; passing it lets tests check the refusal
    without touching DeepSpeed. A local build tag (``0.19.8+abc``) of a supported release is
    accepted; pre-releases and other releases are not.
    """
    if installed is None:
        import deepspeed

        installed = deepspeed.__version__
    supported = ", ".join(SUPPORTED_DEEPSPEED_VERSIONS)
    try:
        version = Version(installed)
    except InvalidVersion:
        version = None
    if version is None or version.is_prerelease or version.is_devrelease or version.base_version not in SUPPORTED_DEEPSPEED_VERSIONS:
        raise UnsupportedDeepSpeedVersion(
            f"dist_memopt.integrations.deepspeed supports DeepSpeed {supported}, found {installed}: "
            "it reads DeepSpeed's partition layout, which changes between releases, so another "
            f"version could give wrong numbers. Install it with `pip install deepspeed=={SUPPORTED_DEEPSPEED_VERSIONS[-1]}` "
            "(or `pip install dist-memopt[deepspeed]`)."
        )
    return installed
