"""`jobcloud-vm`: the scaler daemon and the admins' VM commands.

Configuration is read here, once (flags > JOBCLOUD_VM_* > the TOML file named
by --config or JOBCLOUD_VM_CONFIG), the libvirt hosts and the proxy client are
opened here, and everything is handed to `Scaler`. Every failure an admin can
meet is a `VMError`: printed as one sentence, exit non-zero, no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
from pathlib import Path

from .config import ScalerConfig, load_config
from .errors import ConfigError, VMError
from .policy import warm_reason
from .scaler import Scaler
from .template import DEFAULT_IMAGES, build_template

EXIT_OK = 0
# How long `down`, `drain` and `scale --to` wait for drained VMs to go, unless told.
DEFAULT_WAIT_S = 600.0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(overrides=_overrides(args), config_file=args.config)
        logging.basicConfig(level=config.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if args.run is cmd_build_template:
            return cmd_build_template(config, args)
        scaler = _scaler(config)
        try:
            return args.run(scaler, config, args)
        finally:
            scaler.close()
    except VMError as e:
        print(f"jobcloud-vm: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


# -------------------------------------------------------------------- commands

def cmd_list(scaler: Scaler, config: ScalerConfig, args) -> int:
    rows = scaler.list_vms()
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    print(f"{'NAME':<14} {'HOST':<24} {'STATE':<9} {'WORKER':<14} {'RUNNING':>7} {'AGE':>8}")
    for r in rows:
        state = "lost" if r["lost"] else r["state"]
        print(f"{r['name']:<14} {r['host']:<24} {state:<9} {(r['worker'] or '-'):<14} "
              f"{r['running']:>7} {_age(r['age_s']):>8}")
    return EXIT_OK


def cmd_hosts(scaler: Scaler, config: ScalerConfig, args) -> int:
    rows = scaler.host_status()
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    print(f"{'HOST':<40} {'STATE':<11} {'VMS':>4} {'VCPUS':>5} {'MEMORY':>8} {'ROOM':>5} {'LOST':>4}  STORAGE")
    for r in rows:
        room = "-" if r["room"] is None else str(r["room"])
        print(f"{r['uri']:<40} {'up' if r['reachable'] else 'unreachable':<11} {r['vms']:>4} "
              f"{r['vcpus']:>5} {r['memory_mb']:>6}Mi {room:>5} {r['lost']:>4}  {r['storage']}")
    return EXIT_OK


def cmd_scale(scaler: Scaler, config: ScalerConfig, args) -> int:
    return _settle(scaler, scaler.scale_to(_count(args.to)), args)


def cmd_up(scaler: Scaler, config: ScalerConfig, args) -> int:
    _print(scaler.up(_count(args.n)))
    return EXIT_OK


def cmd_down(scaler: Scaler, config: ScalerConfig, args) -> int:
    return _settle(scaler, scaler.down(_count(args.n)), args)


def cmd_drain(scaler: Scaler, config: ScalerConfig, args) -> int:
    return _settle(scaler, scaler.drain(args.name), args)


def cmd_destroy(scaler: Scaler, config: ScalerConfig, args) -> int:
    _print(scaler.destroy(args.name, force=args.force))
    return EXIT_OK


def cmd_autoscale(scaler: Scaler, config: ScalerConfig, args) -> int:
    if args.once:
        _print(scaler.run_once())
        return EXIT_OK
    stop = threading.Event()

    def first_signal(signum, _frame):
        # Only a flag: the pass in progress finishes, then the loop ends. A second
        # signal gets the default action (stop now); the next start reconciles.
        stop.set()
        signal.signal(signum, signal.SIG_DFL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, first_signal)
    logging.getLogger("vm_provisioning").info(
        "autoscaling every %.0f s (VMs %d-%d%s)", config.interval_s, config.min_vms,
        config.max_vms, f", {warm_reason(config)}" if config.idle_vms else "")
    scaler.run_forever(stop)
    return EXIT_OK


def cmd_build_template(config: ScalerConfig, args) -> int:
    images = [i.strip() for i in args.images.split(",") if i.strip()]
    if not images:
        raise ConfigError("--images must name at least one job image, e.g. jobcloud/python")
    manifest = build_template(Path(config.template_dir), images, force=args.force)
    print(f"template ready in {config.template_dir} (input hash {manifest['input_hash'][:12]})")
    return EXIT_OK


# --------------------------------------------------------------------- helpers

def _scaler(config: ScalerConfig) -> Scaler:
    if not config.admin_token:
        raise ConfigError("no admin token: set JOBCLOUD_VM_ADMIN_TOKEN (or admin_token in the "
                          "config file) to an admin's API token")
    return Scaler(config)


def _settle(scaler, decisions, args) -> int:
    """Print what was decided; wait for the drained VMs to go unless --no-wait."""
    _print(decisions)
    going = {d.vm for d in decisions if d.action.value == "drain"}
    if not going or args.no_wait:
        return EXIT_OK
    print(f"waiting for {len(going)} VM(s) to finish their jobs and go ...", flush=True)
    left = scaler.settle(going, args.wait)
    if left:
        print(f"jobcloud-vm: still draining after {args.wait:g} s: {', '.join(sorted(left))} "
              "(the autoscaler finishes them)", file=sys.stderr)
        return 1
    return EXIT_OK


def _print(decisions) -> None:
    for d in decisions:
        print(f"{d.action.value:<12} {d.vm or '-':<14} {d.reason}")
    if not decisions:
        print("nothing to do")


def _count(n: int) -> int:
    if n < 0:
        raise ConfigError(f"the number of VMs must not be negative (got {n})")
    return n


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _overrides(args) -> dict:
    values = {f.name: getattr(args, f.name, None) for f in dataclasses.fields(ScalerConfig)}
    if args.libvirt_uri:
        values["libvirt_uris"] = tuple(args.libvirt_uri)
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobcloud-vm", description="Worker VMs on libvirt: the autoscaler and admin commands. "
        "Every setting can also come from JOBCLOUD_VM_<NAME> or the config file.")
    parser.add_argument("--config", help="TOML file with the settings (default $JOBCLOUD_VM_CONFIG)")
    parser.add_argument("--libvirt-uri", action="append",
                        help="a libvirt URI; repeat for more hosts (default qemu:///system)")
    for f in dataclasses.fields(ScalerConfig):
        if f.name != "libvirt_uris":
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar=f.name.upper(),
                                help=argparse.SUPPRESS if f.name == "admin_token" else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="our VMs: host, state, worker, running jobs, age")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_list)
    p = sub.add_parser("hosts", help="each libvirt host: reachable, our VMs, vCPUs and memory, room left")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_hosts)
    p = sub.add_parser("scale", help="add or retire VMs so that N stay")
    p.add_argument("--to", type=int, required=True, metavar="N")
    _wait_flags(p)
    p.set_defaults(run=cmd_scale)
    p = sub.add_parser("up", help="add N VMs")
    p.add_argument("n", type=int, metavar="N")
    p.set_defaults(run=cmd_up)
    p = sub.add_parser("down", help="retire N VMs (booting or least busy first; drained, never killed)")
    p.add_argument("n", type=int, metavar="N")
    _wait_flags(p)
    p.set_defaults(run=cmd_down)
    p = sub.add_parser("drain", help="retire one VM once it runs nothing")
    p.add_argument("name", metavar="NAME")
    _wait_flags(p)
    p.set_defaults(run=cmd_drain)
    p = sub.add_parser("destroy", help="remove one VM now (refused while it runs jobs unless --force)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--force", action="store_true", help="even with running jobs (they requeue)")
    p.set_defaults(run=cmd_destroy)
    p = sub.add_parser("autoscale", help="the scaler daemon")
    p.add_argument("--once", action="store_true", help="one pass, print its decisions, exit")
    p.set_defaults(run=cmd_autoscale)
    p = sub.add_parser("build-template", help="build the worker VM template into template_dir")
    p.add_argument("--force", action="store_true", help="rebuild even when nothing changed")
    p.add_argument("--images", default=",".join(DEFAULT_IMAGES), metavar="IMAGE,...",
                   help="job images from this host's Docker engine to bake in (default: %(default)s)")
    p.set_defaults(run=cmd_build_template)
    return parser


def _wait_flags(p) -> None:
    p.add_argument("--no-wait", action="store_true", help="return once the VMs are draining")
    p.add_argument("--wait", type=float, default=DEFAULT_WAIT_S, metavar="SECONDS",
                   help=f"longest wait for drained VMs to go (default {DEFAULT_WAIT_S:g})")


if __name__ == "__main__":
    sys.exit(main())
