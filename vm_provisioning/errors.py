"""The VM provisioning package's exception hierarchy.

Every failure an admin can meet is a `VMError` carrying a sentence that says what
was wrong; `jobcloud-vm` prints it and exits non-zero instead of a traceback.
"""
from __future__ import annotations


class VMError(Exception):
    """Base of every error raised by vm_provisioning."""

    exit_code = 1


class ConfigError(VMError):
    """A configuration value is unknown, mistyped or out of range."""

    exit_code = 2


class LibvirtUnreachable(VMError):
    """A libvirt URI cannot be opened (daemon down, wrong URI, no permission)."""


class TemplateMissing(VMError):
    """The worker VM template (disk, kernel, initrd or manifest) is not there."""


class UnknownVM(VMError):
    """A VM name that the scaler does not manage."""


class BuildError(VMError):
    """Building the VM template (debootstrap, image export, disk creation) failed."""


class SeedError(VMError):
    """Writing a clone's identity seed ISO failed (no genisoimage/xorriso, disk full)."""


class ProxyUnavailable(VMError):
    """The proxy's admin API refused or could not be reached."""
