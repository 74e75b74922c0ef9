"""`jobcloud-worker`: configuration, logging and the clients are set up here,
once, and handed to the daemon."""
from __future__ import annotations

import logging
import sys

import docker
import docker.errors

from .client import WorkerClient
from .config import load_config
from .daemon import Worker
from .errors import EXIT_CONFIG, EXIT_DOCKER, ConfigError
from .sandbox import Policy, Sandbox


def main(argv=None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as e:
        print(f"jobcloud-worker: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    try:
        engine = docker.from_env(timeout=60)
        engine.ping()
    except docker.errors.DockerException as e:
        print(f"jobcloud-worker: cannot reach the Docker engine ({e}); "
              "start it with scripts/docker-up.sh", file=sys.stderr)
        return EXIT_DOCKER
    sandbox = Sandbox(engine, owner=config.name, policy=Policy(
        pids_limit=config.pids_limit, tmpfs_mb=config.tmpfs_mb, nofile=config.nofile,
        fsize_bytes=config.fsize_bytes, runtimes=config.runtimes))
    worker = Worker(config, WorkerClient(config.proxy_url), sandbox)
    worker.install_signal_handlers()
    return worker.work()


if __name__ == "__main__":
    sys.exit(main())
