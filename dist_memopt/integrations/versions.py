"""The one check every integration with deep hooks makes at import: is this a release we tested?

An adapter that reads a framework's internals (DeepSpeed's partitions, torchtitan's container)
could silently give wrong numbers on a release that lays them out differently, so any other
version is refused with a message saying what to install.
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

__all__ = ["UnsupportedVersion", "check_version"]


class UnsupportedVersion(ImportError):
    """The installed framework is not a release the integration was tested against."""


def check_version(package: str, installed: str, supported: tuple[str, ...], reads: str, extra: str,
                  error: type[UnsupportedVersion] = UnsupportedVersion) -> str:
    """Return ``installed``, or raise ``error`` naming the supported releases and the install line.

    A local build tag (``0.19.8+abc``) of a supported release is accepted; pre-releases and other
    releases are not. ``reads`` says what the adapter depends on, ``extra`` is our pip extra.
    """
    try:
        version = Version(installed)
    except InvalidVersion:
        version = None
    if version is None or version.is_prerelease or version.is_devrelease or version.base_version not in supported:
        module = package.lower().replace("-", "_")
        raise error(
            f"dist_memopt.integrations.{module} supports {package} {', '.join(supported)}, found {installed}: "
            f"it reads {reads}, which changes between releases, so another version could give wrong "
            f"numbers. Install it with `pip install {package.lower()}=={supported[-1]}` (or "
            f"`pip install dist-memopt[{extra}]`)."
        )
    return installed
