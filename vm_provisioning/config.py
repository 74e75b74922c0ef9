"""The scaler's configuration: defaults, one optional TOML file, JOBCLOUD_VM_* variables, flags.

Read once at the entry point (`load_config`, called by `jobcloud-vm`) and passed
inward as a `ScalerConfig`; nothing else in the package reads the environment.
Precedence: defaults < file < environment < flags (the layering and coercion are
jobcloud_config's, shared with the proxy). Tests build a `ScalerConfig`
directly (every field has a keyword); `Scaler` runs `validate` on what it is given.
"""
from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from jobcloud_config import SettingError, layered

from .errors import ConfigError

ENV_PREFIX = "JOBCLOUD_VM_"
DOMAIN_TYPES = ("auto", "kvm", "qemu")
# Inside a guest on QEMU user-mode networking, this address is the host's loopback.
USER_NET_HOST = "10.0.2.2"


@dataclass(frozen=True)
class ScalerConfig:
    # The built template: manifest.json, the qcow2 disk, kernel and initrd (`jobcloud-vm build-template`).
    template_dir: str = "./var-vm/template"
    # Clone disks, seed ISOs, console logs and the scaler's state file live here; it must be
    # on the hypervisor's filesystem (shared at the same path for more than one host).
    state_dir: str = "./var-vm/clones"
    # The proxy as the scaler (on the host) reaches it.
    proxy_url: str = "http://127.0.0.1:3000"
    # The proxy as a guest reaches it; empty means proxy_url with a loopback host rewritten
    # to 10.0.2.2, which is what user-mode networking gives the guest.
    guest_proxy_url: str = ""
    # An admin's API token (`jobcloud token create --user admin`): the scaler is admin-only.
    admin_token: str = ""
    # Hypervisor hosts; new VMs go to the one with room running the fewest of ours.
    libvirt_uris: tuple[str, ...] = ("qemu:///system",)
    # Empty: clones are qemu-img files in state_dir, beside the template (one host, or
    # hosts sharing both paths). A name: the template and every clone are volumes of the
    # libvirt storage pool of that name on each host, uploaded over the libvirt
    # connection, so qemu+ssh:// and qemu+tls:// hosts need no shared filesystem.
    storage_pool: str = ""
    # Where a missing storage_pool is created as a dir pool; empty: /var/lib/libvirt/images/<pool>.
    pool_dir: str = ""
    # Per-host room, 0 for no limit: VMs of ours, their vCPUs and their memory on one host.
    host_max_vms: int = 0
    host_max_vcpus: int = 0
    host_max_memory_mb: int = 0
    # Where hosts differ: "URI vms=N vcpus=N memory_mb=N" (any of the three), one entry
    # per host, over the host_max_* above for that host (a list in the file; in the
    # environment, comma-separated entries).
    host_limits: tuple[str, ...] = ()
    # A host whose libvirt connection has failed this long has its VMs' workers revoked
    # (their jobs requeue) as a vanished VM's are; 0: at the first failed pass.
    host_lost_after_s: float = 60.0
    # libvirt keepalive interval (3 unanswered in a row drop the connection), so a host
    # that stops answering fails a pass in seconds instead of hanging it; 0: off.
    libvirt_keepalive_s: int = 5
    # kvm where hardware virtualization works, qemu (software emulation) where it does not;
    # auto asks libvirt whether this host offers kvm. Override where KVM is offered but hangs.
    domain_type: str = "auto"
    # One worker VM: dockerd plus one job of the proxy's default 1 GiB.
    memory_mb: int = 1536
    vcpus: int = 1
    # Job slots each VM's worker offers; None lets the worker decide (its CPU count).
    worker_slots: int | None = None
    # Names of our domains, disks and seeds all start with this, so leftovers are recognisable.
    name_prefix: str = "jc-"
    # Scale up when queued jobs per live worker exceed this.
    queue_per_worker: float = 2.0
    # Fleet bounds: min 0 means no VM at all while nothing is queued.
    min_vms: int = 0
    max_vms: int = 4
    # VMs kept booted, registered and holding no job, so a job that arrives starts at once
    # instead of after a boot (GitLab Runner's idle_count); 0: a queue waits for a boot.
    idle_vms: int = 0
    # VMs added per scale-up decision.
    step: int = 1
    # No scale-up sooner than this after the last one: booting VMs need time to take work.
    cooldown_s: float = 120.0
    # A VM's worker idle this long is retired (down to min_vms).
    idle_time_s: float = 300.0
    # A VM whose worker has not registered by then is replaced (a TCG boot takes about 50 s).
    boot_timeout_s: float = 300.0
    # Seconds of ACPI shutdown before the domain is destroyed.
    shutdown_timeout_s: float = 60.0
    # Seconds between the daemon's passes.
    interval_s: float = 10.0
    # Seconds an HTTP call to the proxy may take.
    http_timeout_s: float = 15.0
    log_level: str = "INFO"

    def limits_for(self, uri: str) -> dict[str, int]:
        """The room of one host: {"vms", "vcpus", "memory_mb"} (0: no limit)."""
        limits = {"vms": self.host_max_vms, "vcpus": self.host_max_vcpus,
                  "memory_mb": self.host_max_memory_mb}
        limits.update(parse_host_limits(self.host_limits).get(uri, {}))
        return limits

    @property
    def resolved_pool_dir(self) -> str:
        return self.pool_dir or f"/var/lib/libvirt/images/{self.storage_pool}"

    @property
    def resolved_guest_proxy_url(self) -> str:
        if self.guest_proxy_url:
            return self.guest_proxy_url.rstrip("/")
        return guest_url_for(self.proxy_url)


HOST_LIMIT_KEYS = ("vms", "vcpus", "memory_mb")


def parse_host_limits(entries) -> dict[str, dict[str, int]]:
    """host_limits' entries as URI -> {key: number}.

    Raises:
        ValueError: an entry that is not "URI key=N ...", an unknown key, a
            number that is not a whole number >= 0, or a URI given twice.
    """
    out: dict[str, dict[str, int]] = {}
    for entry in entries:
        uri, *pairs = entry.split()
        if not pairs or uri in out:
            raise ValueError(entry)
        limits = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in HOST_LIMIT_KEYS or key in limits or not value.isdigit():
                raise ValueError(entry)
            limits[key] = int(value)
        out[uri] = limits
    return out


def _host_limits_problem(cfg) -> str | None:
    """Why host_limits is wrong, in one sentence; None when it is right."""
    try:
        limits = parse_host_limits(cfg.host_limits)
    except ValueError as e:
        return (f"host_limits: {str(e)[:120]!r} is not \"URI vms=N vcpus=N memory_mb=N\" (any of"
                " the three, whole numbers, one entry per host)")
    for uri, room in limits.items():
        if uri not in cfg.libvirt_uris:
            return f"host_limits names {uri}, which is not one of libvirt_uris"
        if room.get("vcpus") and room["vcpus"] < cfg.vcpus:
            return f"host_limits: vcpus for {uri} must be 0 (no limit) or at least vcpus"
        if room.get("memory_mb") and room["memory_mb"] < cfg.memory_mb:
            return f"host_limits: memory_mb for {uri} must be 0 (no limit) or at least memory_mb"
    return None


def guest_url_for(proxy_url: str) -> str:
    """`proxy_url` as a user-mode-networked guest sees it (loopback -> 10.0.2.2)."""
    parts = urlsplit(proxy_url.rstrip("/"))
    host = parts.hostname or ""
    if host in ("127.0.0.1", "localhost", "::1") or host.startswith("127."):
        netloc = USER_NET_HOST + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


def _is_ip(host: str | None) -> bool:
    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True


def load_config(env: dict | None = None, overrides: dict | None = None,
                config_file: str | None = None) -> ScalerConfig:
    """Build the validated configuration.

    Args:
        env: environment mapping (default: os.environ).
        overrides: values that win over everything (command-line flags); None values are ignored.
        config_file: a TOML file (default: $JOBCLOUD_VM_CONFIG); its [vm] table or top level.

    Raises:
        ConfigError: a value is unknown, of the wrong type or out of range.
    """
    env = os.environ if env is None else env
    try:
        # worker_slots: None lets the worker decide; set, it is a number of slots.
        values = layered(ScalerConfig, env=env, prefix=ENV_PREFIX, section="vm",
                         config_file=config_file or env.get(ENV_PREFIX + "CONFIG"),
                         overrides=overrides, nullable={"worker_slots": int})
    except SettingError as e:
        raise ConfigError(str(e)) from None
    return validate(ScalerConfig(**values))


def validate(cfg: ScalerConfig) -> ScalerConfig:
    """Check every value once, so the rest of the package can trust them.

    Raises:
        ConfigError: the first value out of range, in one sentence.
    """
    floats = ("queue_per_worker", "cooldown_s", "idle_time_s", "boot_timeout_s",
              "shutdown_timeout_s", "interval_s", "http_timeout_s", "host_lost_after_s")
    checks = [
        (all(math.isfinite(getattr(cfg, f)) and getattr(cfg, f) >= 0 for f in floats),
         f"{', '.join(floats)} must be finite and not negative"),
        (cfg.domain_type in DOMAIN_TYPES, f"domain_type must be one of {', '.join(DOMAIN_TYPES)}"),
        (len(cfg.libvirt_uris) >= 1, "libvirt_uris must name at least one libvirt URI"),
        (64 <= cfg.memory_mb <= 1024 * 1024, "memory_mb must be between 64 and 1048576"),
        (1 <= cfg.vcpus <= 256, "vcpus must be between 1 and 256"),
        (cfg.worker_slots is None or 1 <= cfg.worker_slots <= 64,
         "worker_slots must be between 1 and 64"),
        (0 <= cfg.min_vms <= cfg.max_vms <= 1000, "min_vms and max_vms must satisfy 0 <= min_vms <= max_vms <= 1000"),
        # More idle VMs than max_vms could never be kept: every pass would want more.
        (0 <= cfg.idle_vms <= cfg.max_vms, "idle_vms must satisfy 0 <= idle_vms <= max_vms"),
        (1 <= cfg.step <= 1000, "step must be between 1 and 1000"),
        (min(cfg.host_max_vms, cfg.host_max_vcpus, cfg.host_max_memory_mb) >= 0,
         "host_max_vms, host_max_vcpus and host_max_memory_mb must not be negative (0: no limit)"),
        # A per-host limit one VM does not fit under would leave every host full for good.
        (cfg.host_max_vcpus == 0 or cfg.host_max_vcpus >= cfg.vcpus,
         "host_max_vcpus must be 0 (no limit) or at least vcpus"),
        (cfg.host_max_memory_mb == 0 or cfg.host_max_memory_mb >= cfg.memory_mb,
         "host_max_memory_mb must be 0 (no limit) or at least memory_mb"),
        # libvirt's own rule for pool names, less what a shell or a path would trip on.
        (cfg.storage_pool == "" or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", cfg.storage_pool)
         is not None, "storage_pool must be empty or 1-64 letters, digits, '.', '_' or '-'"),
        (cfg.pool_dir == "" or os.path.isabs(cfg.pool_dir), "pool_dir must be an absolute path"),
        (_host_limits_problem(cfg) is None, _host_limits_problem(cfg) or ""),
        # Files in state_dir exist on this machine only: a remote host could not
        # open the template or the clones (nor should they share a mount).
        (cfg.storage_pool or not any(urlsplit(u).hostname for u in cfg.libvirt_uris),
         "a remote libvirt host (qemu+ssh://HOST/..., qemu+tls://HOST/...) needs storage_pool:"
         " the template and the clones are volumes of that pool on each host"),
        (0 <= cfg.libvirt_keepalive_s <= 3600, "libvirt_keepalive_s must be between 0 and 3600"),
        (cfg.interval_s > 0 and cfg.http_timeout_s > 0, "interval_s and http_timeout_s must be positive"),
        # Each VM's enrollment token expires boot_timeout_s after its creation (plus a margin).
        (cfg.boot_timeout_s <= 86400, "boot_timeout_s must be at most 86400 (a day)"),
        # It starts each VM's host name, so what a host name label allows.
        (re.fullmatch(r"[a-z][a-z0-9-]{0,15}", cfg.name_prefix) is not None,
         "name_prefix must be 1-16 lowercase letters, digits and dashes, starting with a letter"),
        (urlsplit(cfg.proxy_url).scheme in ("http", "https") and bool(urlsplit(cfg.proxy_url).netloc),
         "proxy_url must be an http:// or https:// URL"),
        (cfg.guest_proxy_url == "" or (urlsplit(cfg.guest_proxy_url).scheme in ("http", "https")
                                       and bool(urlsplit(cfg.guest_proxy_url).hostname)),
         "guest_proxy_url must be an http:// or https:// URL"),
        (not any(c.isspace() or ord(c) < 32 for c in cfg.proxy_url + cfg.guest_proxy_url),
         "proxy_url and guest_proxy_url must not contain spaces or control characters"),
        # The guest has no DNS resolver (the template runs no systemd-resolved):
        # a host name there would leave every VM unregistered until boot_timeout_s.
        (_is_ip(urlsplit(cfg.resolved_guest_proxy_url).hostname),
         "the worker VMs reach the proxy without DNS: set guest_proxy_url (or proxy_url) to a URL"
         " with an IP address, e.g. http://192.168.1.10:3000"),
        (cfg.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
         "log_level must be DEBUG, INFO, WARNING or ERROR"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    return cfg
