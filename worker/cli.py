"""`jobcloud-worker`: configuration, logging and the clients are set up here,
once, and handed to the daemon."""
from __future__ import annotations

import logging
import sys

import docker
import docker.errors

from jobcloud_datadir import ForeignOwner, make_private

from . import jobdisk
from .client import WorkerClient
from .config import load_config
from .daemon import Worker
from .errors import EXIT_CONFIG, EXIT_DOCKER, ConfigError
from .sandbox import Policy, Sandbox, write_hosts_file

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as e:
        print(f"jobcloud-worker: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if config.disk_quota and (why := jobdisk.check_available()):
        print(f"jobcloud-worker: {why}; per-job disk quotas need it "
              "(disk_quota=false runs jobs without one)", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    # urllib3 logs each request's whole URL at DEBUG: for a presigned URL of the
    # object store, its signature (worker/client.py logs only the path).
    logging.getLogger("urllib3").setLevel(max(logging.INFO, logging.getLogger().level))
    try:
        _secure_data_dir(config.data_dir)
        hosts_file = write_hosts_file(config.data_path)
    except (ForeignOwner, OSError) as e:
        print(f"jobcloud-worker: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        engine = docker.from_env(timeout=60)
        if engine.api.base_url.startswith("http+docker://"):
            # The engine's unix socket: no HTTP proxy or .netrc applies, and looking
            # them up in the environment on every engine call was a tenth of the
            # worker's CPU per job.
            engine.api.trust_env = False
        engine.ping()
    except docker.errors.DockerException as e:
        print(f"jobcloud-worker: cannot reach the Docker engine ({e}); "
              "start it with scripts/docker-up.sh", file=sys.stderr)
        return EXIT_DOCKER
    sandbox = Sandbox(engine, owner=config.name, policy=Policy(
        pids_limit=config.pids_limit, tmpfs_mb=config.tmpfs_mb, nofile=config.nofile,
        fsize_bytes=config.fsize_bytes, runtimes=config.runtimes,
        user=f"{config.job_uid}:{config.job_uid}", hosts_file=hosts_file,
        prestart_runtime=_registered(engine, config.prestart_runtime)))
    worker = Worker(config, WorkerClient(config.proxy_url), sandbox)
    worker.install_signal_handlers()
    return worker.work()


def _registered(engine, runtime: str) -> str:
    """`runtime` when the engine has it registered, else "" (its default)."""
    if not runtime:
        return ""
    try:
        registered = engine.info().get("Runtimes") or {}
    except docker.errors.DockerException as e:
        log.warning("cannot list the engine's runtimes (%s); waiting containers take its default", e)
        return ""
    if runtime not in registered:
        log.info("the engine has no %s runtime; waiting containers take its default", runtime)
        return ""
    return runtime


def _secure_data_dir(data_dir: str) -> None:
    """The worker's data directory 0700 and its own files (the worker secret) 0600.

    Not the process umask, and not the job directories below it: a job's
    inputs must stay readable by the container's unprivileged user (runner.py
    and inputs.py give them their modes). The directory itself keeps other
    local users out of them; Docker mounts them as root.
    """
    tightened = make_private(data_dir, recurse_into=())
    if tightened:
        log.warning("data directory %s: removed group/other access from %d file(s) and "
                    "directories", data_dir, tightened)


if __name__ == "__main__":
    sys.exit(main())
