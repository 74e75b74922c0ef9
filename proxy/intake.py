"""Job submission: one path for the web form and the API.

parse the streamed form -> validate every field -> check the script and the
dataset -> store both files durably -> insert the job row -> answer. A job is
acknowledged only after all of that; on any error nothing stays on disk.
"""
from __future__ import annotations

import math
import os
import unicodedata

from . import (arrays, capacity, dependencies, jobenv, limits, requirements, retention, retries,
               scheduler, webhooks)
from .blobs import BlobStore, Upload
from .config import Config
from .errors import ValidationError
from .db import PG_DISPATCH_LOCK
from .store import NewJob, create_job, get_job
from .uploads import ArchiveLimits, FormSpec, check_script, check_zip, parse_form

NAME_MAX = 100
TEXT_FIELDS = ("name", "image", "cpus", "memory_mb", "timeout_s", "gpus", "disk_mb", "csrf_token",
               "webhook_url")


def form_spec(cfg: Config) -> FormSpec:
    texts = {name: 256 for name in TEXT_FIELDS}
    texts["code"] = cfg.max_script_bytes
    texts["webhook_url"] = 4 * webhooks.MAX_URL_LENGTH
    texts["after"] = dependencies.AFTER_MAX_CHARS
    texts["array"] = 64
    texts.update(dict.fromkeys(retries.FORM_FIELDS, 256))
    texts[jobenv.FIELD] = jobenv.field_limit(cfg.job_env_max_vars, cfg.job_env_max_value_bytes)
    return FormSpec(
        files={"script": (cfg.max_script_bytes, "the script"),
               "dataset": (cfg.max_dataset_bytes, "the dataset"),
               "requirements": (requirements.MAX_BYTES, "the requirements file"),
               "params": (cfg.max_params_bytes, "the parameters file")},
        texts=texts, max_parts=cfg.max_form_parts, repeatable=frozenset({jobenv.FIELD}))


def submit_job(conn, cfg: Config, blobs: BlobStore, user: dict, stream, content_type: str | None,
               *, csrf_check=None) -> dict:
    """Accept one job from a multipart body.

    Args:
        csrf_check: called with the form's csrf_token field before anything is
            stored (web form); None for token-authenticated API calls.

    Returns:
        The stored job row, after the files and the row are durable.

    Raises:
        ValidationError, TooLarge, StorageQuotaExceeded: the submission is
            refused; nothing was kept.
    """
    form = parse_form(stream, content_type, form_spec(cfg), blobs)
    try:
        if csrf_check is not None:
            csrf_check(form.fields.get("csrf_token"))
        script, script_name = _script(form, cfg, blobs)
        check_script(script)
        dataset = form.files.get("dataset")
        if dataset is not None:
            check_zip(dataset.path, ArchiveLimits(cfg.zip_max_total_bytes, cfg.zip_max_entries,
                                                  cfg.zip_max_ratio))
        fields = _resources(form.fields, cfg)
        env = jobenv.parse(form.repeated.get(jobenv.FIELD, []), max_vars=cfg.job_env_max_vars,
                           max_value_bytes=cfg.job_env_max_value_bytes)
        retry_policy = retries.parse_policy(form.fields, max_retries=cfg.max_retries,
                                            backoff_max_s=cfg.retry_backoff_max_s)
        webhook_url = form.fields.get("webhook_url", "").strip() or None
        if webhook_url is not None:
            webhook_url = webhooks.check_url(webhook_url, cfg.webhook_allowed_hosts)
        user_limits = limits.get_limits(conn, user["id"])
        limits.check_job(user_limits, fields)
        limits.check_counts(conn, user["id"], user_limits)
        # After the cheap checks: it may ask the package index (requirements.py).
        reqs = _requirements(form, cfg, blobs)
        retention.check_quota(conn, user["id"], user_limits,
                              [script, *(f for f in (dataset, reqs) if f is not None)],
                              default_quota_mb=cfg.storage_quota_mb,
                              default_days=cfg.retention_days)
        # The parents (dependencies.py): the submitter's own jobs, checked now.
        parents = dependencies.resolve(conn, user["id"], form.fields.get("after"),
                                       max_parent_jobs=cfg.max_parent_jobs)
        # A job array (arrays.py): N jobs of this one submission, all checked now.
        array_plan = arrays.plan(form.fields, form.files.get("params"),
                                 form.filenames.get("params"), max_size=cfg.max_array_size)
        if array_plan is not None:
            arrays.check_queued(conn, user["id"], user_limits, array_plan.size)
        dependencies.check_edges(len(parents), array_plan.size if array_plan else 1,
                                 max_edges=cfg.max_dependency_edges)
        capacity_note = capacity.check_job(conn, fields, lease_timeout_s=cfg.lease_timeout_s,
                                           queue_unmet=cfg.queue_unmet_capacity)
        # A job name is free text, not a path: "CNN w/ dropout" keeps its slash.
        name = _display_text(form.fields.get("name", ""), "name") or \
            os.path.splitext(script_name)[0] or "job"
        # Every check runs before the first commit: a refusal must not leave blobs behind.
        dataset_name = (_display_name(form.filenames.get("dataset", ""), "dataset file name")
                        or "dataset.zip") if dataset is not None else None
        # Outside the locks: the S3 store finishes its uploads here, which can
        # take seconds for a large dataset (blobs.py: prepare, then commit).
        kept = [script, *(f for f in (dataset, reqs) if f is not None)]
        for upload in kept:
            blobs.prepare(upload)
        # Dispatched in the same transaction: a worker waiting on a claim is
        # woken with the job already reserved for it (scheduler.dispatch).
        with conn.transaction(lock=PG_DISPATCH_LOCK):
            # The files are put in place under the blob lock: the retention
            # sweep cannot unlink one this job's row is about to refer to.
            retention.hold_blobs(conn)
            # Then the parents, in the order attach always took them (after
            # the blob lock): one that failed since `resolve` refuses the
            # submission before a file is put in place.
            dependencies.lock_parents(conn, parents)
            stored_script = blobs.commit(script)
            stored_dataset = blobs.commit(dataset) if dataset is not None else None
            stored_reqs = blobs.commit(reqs) if reqs is not None else None
            job = create_job(conn, NewJob(
                owner_id=user["id"], name=name, script_name=script_name, script=stored_script,
                dataset_name=dataset_name, dataset=stored_dataset, webhook_url=webhook_url,
                capacity_note=capacity_note, requirements=stored_reqs, **fields))
            dependencies.attach(conn, job["id"], parents)
            retries.store_policy(conn, job["id"], retry_policy)
            jobenv.store(conn, job["id"], env)
            if array_plan is not None:
                # Last of the hooks: the array's other jobs are copies of this row.
                job = arrays.expand(conn, array_plan, job, job["submitted_at"])
            scheduler.dispatch(conn, job["submitted_at"], cfg.lease_timeout_s)
        for upload in kept:
            upload.kept = True   # the row names it: form.discard leaves the stored copy
        return get_job(conn, job["id"])
    finally:
        form.discard()


def _requirements(form, cfg: Config, blobs: BlobStore) -> Upload | None:
    """The job's requirements.txt, normalised (requirements.py); it replaces the
    upload in the form, so a refusal discards it with the rest."""
    upload = form.files.pop("requirements", None)
    if upload is None:
        return None
    try:
        normalised = requirements.check_upload(upload, cfg, blobs)
    finally:
        upload.discard()
    if normalised is not None:
        form.files["requirements"] = normalised
    return normalised


def _script(form, cfg: Config, blobs: BlobStore) -> tuple[Upload, str]:
    upload = form.files.get("script")
    code = form.fields.get("code", "")
    if upload is not None and code.strip():
        raise ValidationError("give the script either as a file or as pasted code, not both",
                              code="script_twice")
    if upload is not None:
        filename = _display_name(form.filenames.get("script", ""), "script file name") or "script.py"
        if not filename.lower().endswith(".py"):
            raise ValidationError(f"the script must be a .py file (got {filename!r})",
                                  code="invalid_script")
        return upload, filename
    if not code.strip():
        raise ValidationError("no script: upload a .py file or paste code", code="missing_script")
    pasted = blobs.new_upload(cfg.max_script_bytes, "the script")
    form.files["script"] = pasted
    pasted.write(code.encode("utf-8"))
    pasted.finish()
    return pasted, "main.py"


def _display_name(value: str, what: str) -> str:
    """A user's file name kept only for display: its last path component, as display text."""
    return _display_text((value or "").replace("\\", "/").rsplit("/", 1)[-1], what)


def _display_text(value: str, what: str) -> str:
    """User-given text kept only for display: printable, bounded."""
    value = (value or "").strip()
    if len(value) > NAME_MAX:
        raise ValidationError(f"the {what} is longer than {NAME_MAX} characters", code="invalid_name")
    if any(unicodedata.category(c).startswith("C") for c in value):
        raise ValidationError(f"the {what} contains control characters", code="invalid_name")
    return value


def _resources(fields: dict, cfg: Config) -> dict:
    image = fields.get("image", "").strip() or cfg.default_image
    if image not in cfg.images:
        raise ValidationError(f"unknown image {image[:80]!r}; choose one of: {', '.join(cfg.images)}",
                              code="unknown_image")
    return {
        "image": image,
        "cpus": _number(fields, "cpus", float, cfg.default_cpus, 0.1, cfg.max_cpus),
        "memory_mb": _number(fields, "memory_mb", int, cfg.default_memory_mb, cfg.min_memory_mb,
                             cfg.max_memory_mb),
        "timeout_s": _number(fields, "timeout_s", int, cfg.default_timeout_s, 1, cfg.max_timeout_s),
        "gpus": _number(fields, "gpus", int, 0, 0, cfg.max_gpus),
        "disk_mb": _number(fields, "disk_mb", int, cfg.default_disk_mb, 1, cfg.max_disk_mb),
    }


def _number(fields: dict, key: str, kind, default, lo, hi):
    raw = fields.get(key, "").strip()
    if raw == "":
        return default
    try:
        value = float(raw) if kind is float else int(raw)
    except ValueError:
        raise ValidationError(f"{key} must be {'a number' if kind is float else 'a whole number'}"
                              f" (got {raw[:40]!r})", code="invalid_resource") from None
    if kind is float and not math.isfinite(value):
        raise ValidationError(f"{key} must be a finite number", code="invalid_resource")
    if not lo <= value <= hi:
        raise ValidationError(f"{key} must be between {lo:g} and {hi:g} (got {raw[:40]})",
                              code="invalid_resource")
    return value
