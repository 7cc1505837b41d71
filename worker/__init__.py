"""variflow: reliable image-variation jobs against paid upstream providers."""

from worker.api import JobInfo, JobNotFound, cancel_job, get_job, submit_variation, wait

__all__ = ["JobInfo", "JobNotFound", "cancel_job", "get_job", "submit_variation", "wait"]
