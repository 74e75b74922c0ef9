"""One worker VM's identity and its libvirt domain XML.

Pure functions: a name, a UUID and a MAC are drawn here, and the XML is built
from them and the template's manifest, so tests can parse and check it without
a hypervisor. Each domain carries, in its <metadata>, the id of the scaler
instance that made it (`scaler_id_of` reads it back): a domain is only ever
cleaned up as a leftover by the scaler whose id it carries, never because its
name merely looks like ours. The XML boots the template's kernel directly (no bootloader in the
image: faster, and the template stays a plain filesystem), on a linked-clone
disk, with the identity seed as a read-only CD-ROM, user-mode networking (the
guest only ever connects out to the proxy) and the serial console in a file so
a boot that never reaches the worker can be read afterwards.
"""
from __future__ import annotations

import re
import secrets
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass

# QEMU's locally administered prefix, which libvirt also uses for the MACs it draws.
MAC_PREFIX = "52:54:00"
# libvirt keeps application metadata only under a namespace of the application's own;
# the URI only names it (.invalid never resolves, so it can clash with no one).
METADATA_NS = "https://jobcloud.invalid/xmlns/vm-scaler/1"
METADATA_TAG = f"{{{METADATA_NS}}}scaler"


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    mac: str
    domain_type: str        # "kvm" or "qemu"
    memory_mb: int
    vcpus: int
    disk: str               # the clone's qcow2
    seed: str               # the NoCloud ISO
    kernel: str
    initrd: str
    cmdline: str
    console_log: str
    scaler_id: str = ""     # the owning scaler instance (state.ScalerState.scaler_id)


def new_name(prefix: str) -> str:
    """A fresh VM name: the prefix, then 10 hex digits (a clash needs ~10^6 live VMs)."""
    return f"{prefix}{secrets.token_hex(5)}"


def is_our_name(name: str, prefix: str) -> bool:
    """True for a name `new_name(prefix)` could have made (leftover detection relies on it)."""
    return re.fullmatch(re.escape(prefix) + r"[0-9a-f]{10}", name) is not None


def new_uuid() -> str:
    return str(uuid.uuid4())


def new_mac() -> str:
    return MAC_PREFIX + "".join(f":{b:02x}" for b in secrets.token_bytes(3))


def domain_xml(spec: DomainSpec) -> str:
    """The libvirt domain XML for `spec`."""
    dom = ET.Element("domain", type=spec.domain_type)
    _text(dom, "name", spec.name)
    _text(dom, "uuid", spec.uuid)
    _text(dom, "memory", str(spec.memory_mb), unit="MiB")
    _text(dom, "vcpu", str(spec.vcpus))
    if spec.scaler_id:
        ET.register_namespace("jobcloud", METADATA_NS)
        ET.SubElement(ET.SubElement(dom, "metadata"), METADATA_TAG, id=spec.scaler_id)
    os_el = ET.SubElement(dom, "os")
    _text(os_el, "type", "hvm", arch="x86_64")
    _text(os_el, "kernel", spec.kernel)
    _text(os_el, "initrd", spec.initrd)
    _text(os_el, "cmdline", spec.cmdline)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")    # so virDomainShutdown reaches systemd as a power button
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2")
    ET.SubElement(disk, "source", file=spec.disk)
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    cdrom = ET.SubElement(devices, "disk", type="file", device="cdrom")
    ET.SubElement(cdrom, "driver", name="qemu", type="raw")
    ET.SubElement(cdrom, "source", file=spec.seed)
    ET.SubElement(cdrom, "target", dev="sda", bus="sata")
    ET.SubElement(cdrom, "readonly")
    nic = ET.SubElement(devices, "interface", type="user")
    ET.SubElement(nic, "mac", address=spec.mac)
    ET.SubElement(nic, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=spec.console_log)
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="file")
    ET.SubElement(console, "source", path=spec.console_log)
    ET.SubElement(console, "target", type="serial", port="0")
    # Entropy for the guest's first boot (SSH host keys, Docker), which otherwise stalls under TCG.
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def scaler_id_of(xml: str | None) -> str | None:
    """The scaler instance id in a domain's XML; None for a domain no scaler marked."""
    if not xml:
        return None
    try:
        mark = ET.fromstring(xml).find(f"metadata/{METADATA_TAG}")
    except ET.ParseError:
        return None
    return None if mark is None else mark.get("id")


def _text(parent: ET.Element, tag: str, text: str, **attrs) -> ET.Element:
    el = ET.SubElement(parent, tag, **attrs)
    el.text = text
    return el
