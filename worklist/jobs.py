"""The scheduler's jobs: thin wrappers that open a session and call a service.

Every job is safe to run twice (claims, leases and deliveries are conditional
updates), so a brief overlap during a leader hand-over does no harm.
"""

from __future__ import annotations

import importlib
import logging

from worklist.config import Settings
from worklist.scheduler import Job

logger = logging.getLogger(__name__)

# (job name, "module:function" taking the runtime, interval setting name)
JOB_TABLE = (
    (
        "reprioritise",
        "worklist.services.worklist:reprioritise_job",
        "reprioritise_interval_seconds",
    ),
    (
        "reprioritise-verification",
        "worklist.services.verification:reprioritise_verification_job",
        "reprioritise_interval_seconds",
    ),
    (
        "expire-claims",
        "worklist.services.worklist:expire_claims_job",
        "expire_claims_interval_seconds",
    ),
    (
        "auto-assign",
        "worklist.services.auto_assignment:auto_assign_job",
        "auto_assign_interval_seconds",
    ),
    ("deliver-outbox", "worklist.services.delivery:deliver_job", "deliver_interval_seconds"),
)


def scheduled_jobs(settings: Settings) -> list[Job]:
    jobs = []
    for name, target, interval in JOB_TABLE:
        module_name, _, function_name = target.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ModuleNotFoundError, AttributeError):
            logger.warning("job %s skipped: %s is not available", name, target)
            continue
        jobs.append(Job(name=name, run=function, every_seconds=float(getattr(settings, interval))))
    return jobs
