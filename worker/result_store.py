"""Where the result images variflow keeps itself live: a local folder, or an S3 bucket.

Both stores take ``put(job_id, name, data, content_type)``, which is atomic (a
reader never sees half an image: the folder store renames a finished file into
place, an S3 PUT is atomic) and idempotent (a task run twice writes the same
object again). Serving differs by nature: the web app sends a folder's file
itself, and redirects to a presigned URL of an S3 object or streams it
(webhooks/results.py).

The S3 store uses boto3, not obstore: boto3 reads the usual AWS configuration
(``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``/``_SECRET_ACCESS_KEY``, profiles,
instance and container roles) the way every other AWS tool does, so any
S3-compatible store works unchanged; presigning is built in; it is synchronous
like the rest of the worker; and it is pure Python (no native wheel to trust on
every platform). A process builds its client once, on first use (worker/runtime.py
holds the store; a forked child builds its own, as sockets must not cross a fork).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from worker.config import S3Location, Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

# S3's answers to a HEAD or GET of a key that is not there (HEAD has no body, so no code).
_MISSING = {"404", "NoSuchKey", "NotFound"}


class StoreUnavailable(OSError):
    """The result store could not be reached or refused the request.

    An OSError, like a folder store's own failures (a full disk), so callers
    handle a failure to store the same way whatever the store.
    """


class ResultStore(Protocol):
    """What the flows write result images to."""

    def put(self, job_id: uuid.UUID, name: str, data: bytes, content_type: str) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class FolderStore:
    """Results as files: ``<folder>/<job id>/<name>``."""

    folder: Path

    def job_folder(self, job_id: uuid.UUID) -> Path:
        return self.folder / str(job_id)

    def put(self, job_id: uuid.UUID, name: str, data: bytes, content_type: str) -> None:
        folder = self.job_folder(job_id)
        folder.mkdir(parents=True, exist_ok=True)
        # A name of this writer's own: two runs of one task never share a half-written file.
        # The dot keeps it from being served (webhooks/results.py).
        tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_bytes(data)
            tmp.replace(folder / name)  # readers never see half a file
        finally:
            tmp.unlink(missing_ok=True)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class StoredObject:
    """An S3 object opened for streaming: read ``chunks`` once, then ``close``."""

    content_type: str
    length: int | None
    chunks: Iterator[bytes]
    close: Callable[[], None]


class S3Store:
    """Results as objects: ``s3://<bucket>/<prefix>/<job id>/<name>``."""

    def __init__(
        self,
        location: S3Location,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        public_endpoint: str | None = None,
    ) -> None:
        self.location = location
        self._timeouts = (connect_timeout, read_timeout)
        self._public_endpoint = public_endpoint
        self._lock = threading.Lock()
        self._client: S3Client | None = None
        self._signer: S3Client | None = None

    def key(self, job_id: uuid.UUID, name: str) -> str:
        prefix = self.location.prefix
        return f"{prefix}/{job_id}/{name}" if prefix else f"{job_id}/{name}"

    def put(self, job_id: uuid.UUID, name: str, data: bytes, content_type: str) -> None:
        key = self.key(job_id, name)
        with _errors(f"PUT {key}"):
            self.client.put_object(
                Bucket=self.location.bucket, Key=key, Body=data, ContentType=content_type
            )

    def exists(self, job_id: uuid.UUID, name: str) -> bool:
        """Whether the object is there (False for an unknown key); StoreUnavailable when
        the store cannot say."""
        key = self.key(job_id, name)
        try:
            with _errors(f"HEAD {key}"):
                self.client.head_object(Bucket=self.location.bucket, Key=key)
        except _Missing:
            return False
        return True

    def open(self, job_id: uuid.UUID, name: str) -> StoredObject | None:
        """The object, opened for streaming; None for an unknown key."""
        key = self.key(job_id, name)
        try:
            with _errors(f"GET {key}"):
                answer = self.client.get_object(Bucket=self.location.bucket, Key=key)
        except _Missing:
            return None
        body = answer["Body"]
        return StoredObject(
            content_type=answer.get("ContentType") or "application/octet-stream",
            length=answer.get("ContentLength"),
            chunks=body.iter_chunks(64 * 1024),
            close=body.close,
        )

    def presigned_url(self, job_id: uuid.UUID, name: str, ttl: int) -> str:
        """A URL that GETs the object for ``ttl`` seconds (signed locally: no request)."""
        key = self.key(job_id, name)
        with _errors(f"presign {key}"):
            return self.signer.generate_presigned_url(
                "get_object", Params={"Bucket": self.location.bucket, "Key": key}, ExpiresIn=ttl
            )

    @property
    def client(self) -> S3Client:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client(None)
        return self._client

    @property
    def signer(self) -> S3Client:
        """The client presigned URLs are made with: signed for the public endpoint if
        there is one (a signature covers the host)."""
        if self._public_endpoint is None:
            return self.client
        if self._signer is None:
            with self._lock:
                if self._signer is None:
                    self._signer = self._make_client(self._public_endpoint)
        return self._signer

    def _make_client(self, endpoint: str | None) -> S3Client:
        # Imported here: boto3 takes most of a second to import, which every process
        # that never touches an S3 store (the CLI, a folder-store deployment) is spared.
        import boto3
        from botocore.config import Config

        # boto3 reads the AWS_* environment and profiles itself; AWS_REGION, which other
        # AWS SDKs read, is the one of the usual variables botocore does not.
        session = boto3.session.Session()
        region = os.environ.get("AWS_REGION") or session.region_name
        connect, read = self._timeouts
        config = Config(
            connect_timeout=connect,
            read_timeout=read,
            # Few retries: a web request waiting on a store that is down answers 503
            # soon, and a worker's failed write is retried by its task anyway.
            retries={"mode": "standard", "max_attempts": 3},
            signature_version="s3v4",
        )
        return session.client("s3", region_name=region, endpoint_url=endpoint, config=config)

    def close(self) -> None:
        for client in (self._client, self._signer):
            if client is not None:
                client.close()
        self._client = self._signer = None


def open_store(settings: Settings) -> FolderStore | S3Store:
    """The store of ``settings`` (nothing is connected until first used)."""
    location = settings.results_bucket
    if location is None:
        return FolderStore(settings.results_folder)
    public = settings.result_public_endpoint
    return S3Store(
        location,
        connect_timeout=settings.http_connect_timeout,
        read_timeout=settings.http_timeout,
        public_endpoint=str(public).rstrip("/") if public is not None else None,
    )


class _Missing(Exception):
    """The key is not in the bucket."""


@contextmanager
def _errors(what: str) -> Iterator[None]:
    """Boto's exceptions as _Missing (an unknown key) or StoreUnavailable."""
    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            raise _Missing(what) from None
        raise StoreUnavailable(f"result store refused {what}: {code or 'error'}") from exc
    except BotoCoreError as exc:  # no connection, a timeout, no credentials
        # The class, not the message: it names the endpoint, and this may reach a job's
        # error message (the details are in the chained exception, which is logged).
        raise StoreUnavailable(f"result store unavailable ({type(exc).__name__})") from exc
