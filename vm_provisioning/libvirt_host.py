"""One hypervisor host, through libvirt-python: the only module that imports libvirt.

Every libvirt error is translated here into the package's own errors, so the
scaler and the CLI never see a `libvirtError`. Connections are opened once at
the entry point (`open_host`, `open_hosts`) and passed in: a fresh connection to
`test:///default` is a fresh, empty hypervisor, so tests share one.

A connection that fails (libvirtd restarted, an ssh link to a remote host
dropped) is dropped at once, and `reconnect_if_due` opens it again at the
scaler's next pass, then with a capped exponential backoff while it keeps
failing; meanwhile the scaler leaves that host out of its passes.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET

from .errors import LibvirtUnreachable, VMError

log = logging.getLogger(__name__)

# Seconds before the second reopening attempt of a lost connection, doubled after
# each further failure up to the cap: a host down for hours costs one attempt per
# five minutes, not one per pass.
RECONNECT_FIRST_S = 5.0
RECONNECT_MAX_S = 300.0


def _libvirt():
    try:
        import libvirt
    except ImportError:
        raise LibvirtUnreachable("libvirt-python is not installed: pip install 'jobcloud[vm]'") from None
    return libvirt


class Host:
    """A libvirt connection and the few domain operations the scaler needs.

    `conn` is None while the connection is lost; every operation then raises
    LibvirtUnreachable until `reconnect_if_due` has opened it again.
    """

    def __init__(self, uri: str, conn):
        self.uri = uri
        self.conn = conn
        self._libvirt = _libvirt()
        self._failures = 0              # failed reopening attempts in a row
        self._retry_at: float | None = None   # None: try at the next chance

    def close(self) -> None:
        if self.conn is None:
            return
        try:
            self.conn.close()
        except self._libvirt.libvirtError:
            pass    # closing a connection whose daemon went away: nothing left to release
        self.conn = None

    @property
    def reachable(self) -> bool:
        return self.conn is not None

    def reconnect_if_due(self, now: float) -> bool:
        """Reopen a lost connection unless its backoff has not passed yet.

        Args:
            now: the caller's clock, which the backoff is measured on.

        Returns:
            Whether the host is connected now.
        """
        if self.conn is not None:
            return True
        if self._retry_at is not None and now < self._retry_at:
            return False
        try:
            self.conn = _open(self.uri)
        except LibvirtUnreachable as e:
            self._failures += 1
            wait = min(RECONNECT_MAX_S, RECONNECT_FIRST_S * 2 ** (self._failures - 1))
            self._retry_at = now + wait
            log.warning("%s; next attempt in %.0f s", e, wait)
            return False
        log.info("reconnected to libvirt at %s", self.uri)
        self._failures, self._retry_at = 0, None
        return True

    def _lost(self) -> None:
        """Drop a failed connection; the next `reconnect_if_due` opens a new one."""
        self.close()
        self._retry_at = None

    # ------------------------------------------------------------------ queries

    def domain_names(self) -> set[str]:
        """Names of every domain defined on this host (running or not)."""
        return {d.name() for d in self._call(self._conn().listAllDomains, 0)}

    def is_active(self, name: str) -> bool:
        dom = self._lookup(name)
        return dom is not None and bool(self._call(dom.isActive))

    def exists(self, name: str) -> bool:
        return self._lookup(name) is not None

    def domain_xml(self, name: str) -> str | None:
        """The domain's XML as libvirt holds it; None when there is no such domain."""
        dom = self._lookup(name)
        return None if dom is None else self._call(dom.XMLDesc, 0)

    def offers_kvm(self) -> bool:
        """Whether libvirt reports a kvm domain type for x86_64 guests on this host."""
        try:
            caps = ET.fromstring(self._call(self._conn().getCapabilities))
        except ET.ParseError:
            return False
        return any(arch.get("name") == "x86_64"
                   and any(d.get("type") == "kvm" for d in arch.iter("domain"))
                   for arch in caps.iter("arch"))

    # ---------------------------------------------------------------- lifecycle

    def define_and_start(self, xml: str) -> None:
        dom = self._call(self._conn().defineXML, xml)
        try:
            self._call(dom.create)
        except VMError:
            self._call(dom.undefine)
            raise

    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI); a domain already off is fine."""
        dom = self._lookup(name)
        if dom is not None and self._call(dom.isActive):
            self._call(dom.shutdown)

    def destroy_and_undefine(self, name: str) -> None:
        """Power off at once and forget the domain; one already gone is fine."""
        dom = self._lookup(name)
        if dom is None:
            return
        if self._call(dom.isActive):
            self._call(dom.destroy)
        self._call(dom.undefine)

    # ------------------------------------------------------------------ helpers

    def _lookup(self, name: str):
        try:
            return self._conn().lookupByName(name)
        except self._libvirt.libvirtError as e:
            if e.get_error_code() == self._libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise self._translate(e) from None

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._libvirt.libvirtError as e:
            raise self._translate(e) from None

    def _conn(self):
        if self.conn is None:
            raise LibvirtUnreachable(f"libvirt at {self.uri} is unreachable (reconnecting)")
        return self.conn

    def _translate(self, e) -> VMError:
        libvirt = self._libvirt
        text = (e.get_error_message() or str(e)).strip()
        # INVALID_CONN: the connection object itself is dead (closed under us).
        if e.get_error_code() in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR,
                                  libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_AUTH_FAILED,
                                  libvirt.VIR_ERR_INVALID_CONN):
            self._lost()
            return LibvirtUnreachable(f"libvirt at {self.uri} failed: {text}")
        return VMError(f"libvirt at {self.uri}: {text}")


def open_host(uri: str) -> Host:
    """Connect to one libvirt URI.

    Raises:
        LibvirtUnreachable: the daemon is down, the URI is wrong, or access is refused.
    """
    return Host(uri, _open(uri))


def open_hosts(uris) -> list[Host]:
    """One Host per URI. A host that cannot be opened now is kept, to be reopened
    at the scaler's next pass, so one dead host of several does not stop the fleet.

    Raises:
        LibvirtUnreachable: not one of the URIs can be opened (the first one's error).
    """
    hosts, errors = [], []
    for uri in uris:
        try:
            hosts.append(open_host(uri))
        except LibvirtUnreachable as e:
            errors.append(e)
            hosts.append(Host(uri, None))
    if len(errors) == len(hosts):
        raise errors[0]
    for e in errors:
        log.warning("%s; the other hosts carry on, and it is retried each pass", e)
    return hosts


def _open(uri: str):
    libvirt = _libvirt()
    # libvirt prints every error to stderr by default; we report them ourselves, once.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise LibvirtUnreachable(f"cannot connect to libvirt at {uri}: "
                                 f"{(e.get_error_message() or str(e)).strip()}") from None
    if conn is None:
        raise LibvirtUnreachable(f"cannot connect to libvirt at {uri}")
    return conn

