"""One hypervisor host, through libvirt-python: the only module that imports libvirt.

Every libvirt error is translated here into the package's own errors, so the
scaler and the CLI never see a `libvirtError`. Connections are opened once at
the entry point (`open_host`, `open_hosts`) and passed in: a fresh connection to
`test:///default` is a fresh, empty hypervisor, so tests share one.

A connection that fails (libvirtd restarted, an ssh link to a remote host
dropped) is dropped at once, and `reconnect_if_due` opens it again at the
scaler's next pass, then with a capped exponential backoff while it keeps
failing; meanwhile the scaler leaves that host out of its passes. A host that
stops answering without closing the link (a hung daemon, a network partition)
would block a call for as long as TCP takes to give up: libvirt's keepalive
(`keepalive_s`; it needs libvirt's event loop, run in one daemon thread started
by the first connection) fails it within a few intervals instead.

Storage volumes: the template's files and each clone's disk, seed and console
log can live in a storage pool on the host (vm_provisioning/storage.py decides
what goes where); bytes reach it by libvirt's upload stream, so a remote host
needs no shared filesystem.
"""
from __future__ import annotations

import logging
import threading
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

from .errors import LibvirtUnreachable, VMError

log = logging.getLogger(__name__)

# Seconds before the second reopening attempt of a lost connection, doubled after
# each further failure up to the cap: a host down for hours costs one attempt per
# five minutes, not one per pass.
RECONNECT_FIRST_S = 5.0
RECONNECT_MAX_S = 300.0
# Unanswered keepalive messages before libvirt drops a connection (libvirt's own default).
KEEPALIVE_COUNT = 3
# Bytes per write of a volume upload: large enough to keep the stream busy, small
# enough that a multi-GiB template never sits in memory.
UPLOAD_CHUNK = 1024 * 1024

_event_loop_lock = threading.Lock()
_event_loop_started = False


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

    def __init__(self, uri: str, conn, keepalive_s: int = 0):
        self.uri = uri
        self.conn = conn
        self.keepalive_s = keepalive_s
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
            self.conn = _open(self.uri, self.keepalive_s)
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

    # ------------------------------------------------------------------ storage

    def pool_path(self, pool: str, create_in: str | None = None) -> str:
        """The target directory of storage pool `pool`, started if it was not.

        Args:
            create_in: where to create it as a dir pool if the host has none of that
                name (None: do not create it).

        Raises:
            VMError: there is no such pool and it could not be created here.
        """
        p = self._pool(pool, missing_ok=create_in is not None)
        if p is None:
            xml = (f"<pool type='dir'><name>{escape(pool)}</name><target><path>{escape(create_in)}"
                   "</path><permissions><mode>0711</mode></permissions></target></pool>")
            p = self._call(self._conn().storagePoolDefineXML, xml, 0)
            try:
                # A dir pool's build makes the directory; one already there is used as it is.
                self._call(p.build, 0)
                self._call(p.setAutostart, 1)
            except VMError as e:
                self._call(p.undefine)
                raise VMError(f"{e}; define the dir pool {pool!r} on that host yourself "
                              f"(virsh pool-define-as {pool} dir --target DIR; pool-build; "
                              f"pool-start; pool-autostart) or set pool_dir") from None
            log.info("created the storage pool %s at %s on %s", pool, create_in, self.uri)
        if not self._call(p.isActive):
            self._call(p.create, 0)
        return ET.fromstring(self._call(p.XMLDesc, 0)).findtext("target/path")

    def volumes(self, pool: str) -> dict[str, str]:
        """Volume name -> path in `pool`, as the pool's directory holds them now."""
        p = self._pool(pool)
        # A refresh picks up files libvirt did not make itself (the console logs).
        self._call(p.refresh, 0)
        return {v.name(): self._call(v.path) for v in self._call(p.listAllVolumes, 0)}

    def volume_backing(self, pool: str, name: str) -> str | None:
        """The path of a volume's backing file; None for none (or no such volume)."""
        vol = self._volume(pool, name)
        if vol is None:
            return None
        return ET.fromstring(self._call(vol.XMLDesc, 0)).findtext("backingStore/path")

    def upload(self, pool: str, name: str, src, size: int, mode: int = 0o600) -> str:
        """Create volume `name` in `pool` from `size` bytes read from the file object
        `src`, through libvirt's stream (so over ssh or TLS too). Returns its path.

        A volume of that name already there is replaced. One whose upload fails
        is deleted.
        """
        self.delete_volume(pool, name)
        vol = self._call(self._pool(pool).createXML, _volume_xml(name, size, "raw", mode), 0)
        stream = self._call(self._conn().newStream, 0)
        try:
            self._call(vol.upload, stream, 0, size, 0)
            sent = 0
            while sent < size:
                chunk = src.read(min(UPLOAD_CHUNK, size - sent))
                if not chunk:
                    raise VMError(f"{name}: the file ended after {sent} of {size} bytes")
                self._send(stream, chunk)
                sent += len(chunk)
            self._call(stream.finish)
        except BaseException:
            try:
                stream.abort()
            except self._libvirt.libvirtError:
                pass    # the stream is already broken: aborting it has nothing left to do
            try:
                self._call(vol.delete, 0)
            except VMError as e:
                log.warning("could not delete the failed upload %s on %s: %s", name, self.uri, e)
            raise
        return self._call(vol.path)

    def create_overlay(self, pool: str, name: str, backing: str, size: int) -> str:
        """A qcow2 volume `name` backed by the qcow2 file `backing` (a linked clone),
        private to its owner. Returns its path."""
        self.delete_volume(pool, name)
        vol = self._call(self._pool(pool).createXML, _volume_xml(name, size, "qcow2", 0o600, backing), 0)
        return self._call(vol.path)

    def download(self, pool: str, name: str, limit: int) -> bytes:
        """At most the last `limit` bytes of a volume; b"" for no such volume."""
        vol = self._volume(pool, name)
        if vol is None:
            return b""
        size = self._call(vol.info)[1]
        offset = max(0, size - limit)
        stream = self._call(self._conn().newStream, 0)
        chunks: list[bytes] = []
        try:
            self._call(vol.download, stream, offset, size - offset, 0)
            while True:
                data = self._call(stream.recv, UPLOAD_CHUNK)
                if not data or isinstance(data, int):
                    break
                chunks.append(data)
            self._call(stream.finish)
        except VMError:
            try:
                stream.abort()
            except self._libvirt.libvirtError:
                pass    # already broken
            raise
        return b"".join(chunks)

    def delete_volume(self, pool: str, name: str) -> None:
        """Delete a volume; one already gone is fine."""
        vol = self._volume(pool, name)
        if vol is not None:
            self._call(vol.delete, 0)

    def _send(self, stream, data: bytes) -> None:
        # A blocking stream may still take less than it was given.
        while data:
            n = self._call(stream.send, data)
            if n < 0:
                raise VMError(f"libvirt at {self.uri}: the upload stream refused data")
            data = data[n:]

    def _pool(self, name: str, missing_ok: bool = False):
        try:
            return self._conn().storagePoolLookupByName(name)
        except self._libvirt.libvirtError as e:
            if e.get_error_code() == self._libvirt.VIR_ERR_NO_STORAGE_POOL:
                if missing_ok:
                    return None
                raise VMError(f"libvirt at {self.uri} has no storage pool {name!r}") from None
            raise self._translate(e) from None

    def _volume(self, pool: str, name: str):
        p = self._pool(pool)
        try:
            return p.storageVolLookupByName(name)
        except self._libvirt.libvirtError as e:
            if e.get_error_code() == self._libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise self._translate(e) from None

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
        # INVALID_CONN: the connection object itself is dead (closed under us); a
        # keepalive timeout is an INTERNAL_ERROR from the RPC layer, told by the
        # connection being no longer alive.
        if e.get_error_code() in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_SYSTEM_ERROR,
                                  libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_AUTH_FAILED,
                                  libvirt.VIR_ERR_INVALID_CONN) or not self._alive():
            self._lost()
            return LibvirtUnreachable(f"libvirt at {self.uri} failed: {text}")
        return VMError(f"libvirt at {self.uri}: {text}")

    def _alive(self) -> bool:
        if self.conn is None:
            return False
        try:
            return self.conn.isAlive() == 1
        except self._libvirt.libvirtError:
            return False


def open_host(uri: str, keepalive_s: int = 0) -> Host:
    """Connect to one libvirt URI.

    Args:
        keepalive_s: libvirt keepalive interval; 0 for none.

    Raises:
        LibvirtUnreachable: the daemon is down, the URI is wrong, or access is refused.
    """
    return Host(uri, _open(uri, keepalive_s), keepalive_s)


def open_hosts(uris, keepalive_s: int = 0) -> list[Host]:
    """One Host per URI. A host that cannot be opened now is kept, to be reopened
    at the scaler's next pass, so one dead host of several does not stop the fleet.

    Raises:
        LibvirtUnreachable: not one of the URIs can be opened (the first one's error).
    """
    hosts, errors = [], []
    for uri in uris:
        try:
            hosts.append(open_host(uri, keepalive_s))
        except LibvirtUnreachable as e:
            errors.append(e)
            hosts.append(Host(uri, None, keepalive_s))
    if len(errors) == len(hosts):
        raise errors[0]
    for e in errors:
        log.warning("%s; the other hosts carry on, and it is retried each pass", e)
    return hosts


def _open(uri: str, keepalive_s: int = 0):
    libvirt = _libvirt()
    # libvirt prints every error to stderr by default; we report them ourselves, once.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    if keepalive_s:
        _start_event_loop(libvirt)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise LibvirtUnreachable(f"cannot connect to libvirt at {uri}: "
                                 f"{(e.get_error_message() or str(e)).strip()}") from None
    if conn is None:
        raise LibvirtUnreachable(f"cannot connect to libvirt at {uri}")
    if keepalive_s:
        try:
            conn.setKeepAlive(keepalive_s, KEEPALIVE_COUNT)
        except libvirt.libvirtError as e:
            # Drivers that run in this process (test:///) have no link to keep alive.
            if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                conn.close()
                raise LibvirtUnreachable(f"libvirt at {uri} refused keepalive: "
                                         f"{(e.get_error_message() or str(e)).strip()}") from None
    return conn


def _start_event_loop(libvirt) -> None:
    """libvirt's default event loop, in one daemon thread for the process: keepalive
    messages are sent and checked from it. Registered before the first connection
    opens, as libvirt requires."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run():
            while True:
                libvirt.virEventRunDefaultImpl()
        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def _volume_xml(name: str, size: int, fmt: str, mode: int, backing: str | None = None) -> str:
    backing_xml = (f"<backingStore><path>{escape(backing)}</path><format type='qcow2'/></backingStore>"
                   if backing else "")
    return (f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{size}</capacity>"
            f"<allocation unit='bytes'>0</allocation><target><format type='{fmt}'/>"
            f"<permissions><mode>{mode:04o}</mode></permissions></target>{backing_xml}</volume>")

