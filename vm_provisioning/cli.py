"""`jobcloud-vm`: the libvirt scaler's entry point (lands with issue #4)."""
import sys


def main(argv=None) -> int:
    print("jobcloud-vm: the VM scaler is not built yet (see issue #4)", file=sys.stderr)
    return 2
