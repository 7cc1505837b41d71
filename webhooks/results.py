"""Result images variflow stores itself (inline provider results, archived copies).

``GET /results/<job id>/<name>`` serves them from the result store
(worker/result_store.py): a folder's file is sent as it is; an S3 object is a
302 to a presigned URL valid ``VARIFLOW_RESULT_URL_TTL`` seconds, or its bytes
streamed through (``VARIFLOW_RESULT_SERVE=stream``). The /v1 API's results
route serves its stored copies with :func:`stored_result` too.
"""

from __future__ import annotations

import logging
import uuid

from flask import Blueprint, Response, abort, redirect, send_from_directory
from flask.typing import ResponseReturnValue
from werkzeug.wrappers import Response as AnyResponse

from webhooks import problems
from webhooks.context import runtime
from webhooks.problems import ProblemError
from worker.config import Settings
from worker.result_store import FolderStore, S3Store, StoreUnavailable

bp = Blueprint("results", __name__, url_prefix="/results")
log = logging.getLogger(__name__)

# A result never changes once stored (a re-run writes the same image under the same name).
MAX_AGE = 3600
STORE_DOWN = "the result store is unavailable; try again"


@bp.get("/<job_id>/<name>")
def result_image(job_id: str, name: str) -> ResponseReturnValue:
    try:
        job = uuid.UUID(job_id)
    except ValueError:
        abort(404)
    rt = runtime()
    try:
        found = stored_result(rt.results, rt.settings, job, name)
    except StoreUnavailable:
        # The same problem the /v1 API's results route answers (webhooks/v1/views.py).
        return problems.response(ProblemError(503, STORE_DOWN, headers={"Retry-After": "5"}))
    if found is None:
        abort(404)
    return found


def stored_result(
    store: FolderStore | S3Store, settings: Settings, job_id: uuid.UUID, name: str
) -> AnyResponse | None:
    """The answer serving stored image ``name`` of a job; None when there is no such
    image. Raises StoreUnavailable (logged here) when the store cannot say."""
    if not name or name.startswith(".") or "/" in name:
        return None  # a file being written (".1.png.<id>.tmp") is never served half-written
    if isinstance(store, FolderStore):
        folder = store.job_folder(job_id)
        if not (folder / name).is_file():
            return None
        # send_from_directory refuses names that escape the folder, and types the
        # file by its extension (archives keep png, jpg or webp as the provider sent).
        return send_from_directory(folder, name, max_age=MAX_AGE)
    try:
        return _from_s3(store, settings, job_id, name)
    except StoreUnavailable:
        log.exception("result %s/%s: the result store did not answer", job_id, name)
        raise


def _from_s3(
    store: S3Store, settings: Settings, job_id: uuid.UUID, name: str
) -> AnyResponse | None:
    if settings.result_serve == "stream":
        stored = store.open(job_id, name)
        if stored is None:
            return None
        streamed = Response(stored.chunks, mimetype=stored.content_type, direct_passthrough=True)
        if stored.length is not None:
            streamed.content_length = stored.length
        streamed.cache_control.max_age = MAX_AGE
        streamed.call_on_close(stored.close)
        return streamed
    # A HEAD first: an unknown name is our 404, not the store's error page after the redirect.
    if not store.exists(job_id, name):
        return None
    answer = redirect(store.presigned_url(job_id, name, settings.result_url_ttl), 302)
    # The URL expires: no cache may keep the redirect longer than that.
    answer.cache_control.no_store = True
    return answer
