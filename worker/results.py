"""Result images variflow keeps itself, in the result store (worker/result_store.py),
served by the web app under /results/."""

from __future__ import annotations

import uuid
from dataclasses import replace
from pathlib import Path

from worker.config import Settings
from worker.result_store import ResultStore
from worker.status import UpstreamState


def job_folder(settings: Settings, job_id: uuid.UUID) -> Path:
    """The job's folder in a folder store (the default)."""
    return settings.results_folder / str(job_id)


def stored_url(settings: Settings, job_id: uuid.UUID, name: str) -> str:
    """Where the web app serves the job's stored image ``name``."""
    return f"{settings.public_base}/results/{job_id}/{name}"


def stored_name(settings: Settings, job_id: uuid.UUID, url: str | None) -> str | None:
    """The file name of one of the job's stored images from its URL (inline results,
    archived copies), or None for any other URL (a provider's)."""
    prefix = stored_url(settings, job_id, "")
    if not url or not url.startswith(prefix):
        return None
    name = url[len(prefix) :]
    return name if name and "/" not in name and not name.startswith(".") else None


def store_inline(
    store: ResultStore, settings: Settings, job_id: uuid.UUID, state: UpstreamState
) -> UpstreamState:
    """A state whose inline images are stored and listed among its image URLs.

    Raises OSError (StoreUnavailable for S3) when they cannot be stored.
    """
    if not state.images:
        return state
    urls = store_inline_images(store, settings, job_id, state.images)
    return replace(state, image_urls=state.image_urls + urls, images=())


def store_inline_images(
    store: ResultStore, settings: Settings, job_id: uuid.UUID, images: tuple[bytes, ...]
) -> tuple[str, ...]:
    """Write images a provider returned inline; return the URLs they are served at.

    Written again under the same names when a task runs twice."""
    urls = []
    for n, content in enumerate(images, 1):
        name = f"{n}.png"
        store.put(job_id, name, content, "image/png")
        urls.append(stored_url(settings, job_id, name))
    return tuple(urls)
