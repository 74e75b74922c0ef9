"""`jobcloud-worker`: the daemon's entry point (the daemon itself lands with issue #3)."""
import sys


def main(argv=None) -> int:
    print("jobcloud-worker: the worker daemon is not built yet (see issue #3); "
          "the protocol client is worker/client.py", file=sys.stderr)
    return 2
