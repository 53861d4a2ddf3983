"""The S3 store (`s3://bucket/prefix`): obstore for reads, small writes and presigned URLs;
botocore for the multipart calls obstore does not expose.

obstore 0.12 (object_store 0.14) has no UploadPartCopy of a byte range: its multipart writer
only uploads bytes, and its `copy` copies whole objects. So a stamp is materialised with
botocore: CreateMultipartUpload, UploadPartCopy (CopySourceRange, CopySourceIfMatch on the
base's ETag) for the unchanged ranges, UploadPart for the parts holding changed bytes (as
`pieces.plan_parts` chose them), and CompleteMultipartUpload with `If-None-Match: *`, which
makes the whole object create-if-absent: the loser of a race gets 412, aborts its upload, and
reports created=False. Large put_if_absent uploads use the same multipart path, streaming
the file in 8 MiB parts (the last part may be smaller).
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path
from typing import Iterator, Sequence

from obstore import exceptions as obx
from obstore.store import S3Store

from builder import log
from builder.errors import StorageError
from builder.storage import pieces as pc
from builder.storage.errors import ObjectNotFoundError
from builder.storage.keys import validate_key
from builder.storage.remote import obstore_client_options, split_bucket_url
from builder.storage.settings import StorageSettings
from builder.storage.store import PutResult, StampResult, Store

# Below this, one PUT with If-None-Match (obstore); above, a multipart upload in PART_SIZE parts.
MULTIPART_THRESHOLD = 16 * pc.MIB
PART_SIZE = 8 * pc.MIB
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class _LostRace(Exception):
    """CompleteMultipartUpload answered 412: the key was created by someone else first."""


class S3BucketStore(Store):
    kind = "s3"
    presigned_links = True
    pins_ranges_to_etag = True

    def __init__(self, bucket: str, prefix: str, settings: StorageSettings):
        endpoint = settings.s3_endpoint
        client, retry = obstore_client_options(settings, endpoint)
        config: dict = {"region": settings.s3_region}
        if endpoint:
            config["endpoint"] = endpoint
        if settings.s3_access_key_id and settings.s3_secret_access_key:
            config["access_key_id"] = settings.s3_access_key_id
            config["secret_access_key"] = settings.s3_secret_access_key.reveal()
            if settings.s3_session_token:
                config["session_token"] = settings.s3_session_token.reveal()
        url = f"s3://{bucket}/{prefix}".rstrip("/") + (f" at {endpoint}" if endpoint else "")
        # The prefix is applied here, not by obstore, so obstore, botocore and presigned URLs agree.
        super().__init__(url, settings, prefix, S3Store(bucket, config=config, client_options=client, retry_config=retry))
        self.bucket = bucket
        self._boto = None
        self._boto_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, settings: StorageSettings) -> "S3BucketStore":
        bucket, prefix = split_bucket_url(url, scheme="s3", service="S3", noun="bucket", valid=_BUCKET_RE,
                                          credentials_hint="put credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        return cls(bucket, prefix, settings)

    # -- botocore, for the multipart calls ------------------------------------------------------

    def _client(self):
        with self._boto_lock:
            if self._boto is None:
                import botocore.session
                from botocore.config import Config

                s = self.settings
                config = Config(
                    connect_timeout=s.connect_timeout_s,
                    read_timeout=s.read_timeout_s,
                    retries={"total_max_attempts": s.max_retries + 1, "mode": "standard"},
                    # Custom endpoints (SeaweedFS, MinIO...) are addressed path-style, as obstore does.
                    s3={"addressing_style": "path" if s.s3_endpoint else "auto"},
                    # Only the checksums S3 requires: S3-compatible servers differ on the optional ones.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
                kwargs = {}
                if s.s3_access_key_id and s.s3_secret_access_key:
                    kwargs = {"aws_access_key_id": s.s3_access_key_id,
                              "aws_secret_access_key": s.s3_secret_access_key.reveal(),
                              "aws_session_token": s.s3_session_token.reveal() if s.s3_session_token else None}
                self._boto = botocore.session.Session().create_client(
                    "s3", region_name=s.s3_region, endpoint_url=s.s3_endpoint, config=config, **kwargs)
            return self._boto

    def _boto_error(self, exc: Exception, op: str, key: str) -> StorageError:
        import botocore.exceptions as bx

        log.debug(f"storage {self.url}: {op} {key}: {type(exc).__name__}: {exc}")
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                            bx.ConnectionClosedError, bx.HTTPClientError)):
            return self.unavailable(op, key)
        if isinstance(exc, bx.NoCredentialsError):
            return StorageError(f"storage {self.url}: no S3 credentials", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if isinstance(exc, bx.ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = exc.response.get("Error", {}).get("Code", "")
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "RequestTimeout"):
                return self.unavailable(op, key, code)
            if status in (401, 403):
                return StorageError(f"storage {self.url} refused this machine's credentials ({op} {key}: {code})",
                                    "check the access key and secret and the bucket policy")
            if code in ("NoSuchKey", "NoSuchBucket") or status == 404:
                return ObjectNotFoundError(f"storage {self.url} has no {'bucket' if code == 'NoSuchBucket' else 'object'} for {key}", key=key)
            return StorageError(f"storage {self.url}: {op} {key} failed: {code or status}",
                                "the backend's answer is in the debug log (--verbose)")
        if isinstance(exc, bx.BotoCoreError):
            return StorageError(f"storage {self.url}: {op} {key} failed ({type(exc).__name__})",
                                "the backend's answer is in the debug log (--verbose)")
        return self._translate(exc, op, key)

    def _multipart(self, key: str, parts: Iterator[tuple[str, object]]) -> bool:
        """Run one multipart upload of `parts` (("copy", (src_key, etag, start, end)) or
        ("bytes", data)) and complete it only if `key` does not exist. True if it created `key`."""
        import botocore.exceptions as bx

        client, full = self._client(), self._full(key)
        stage = "create multipart upload"
        upload_id = None
        try:
            upload_id = client.create_multipart_upload(Bucket=self.bucket, Key=full)["UploadId"]
            done = []
            for number, (kind, value) in enumerate(parts, start=1):
                if kind == "copy":
                    src_key, etag, start, end = value
                    stage = f"copy part {number} from {src_key}"
                    extra = {"CopySourceIfMatch": etag} if etag else {}
                    answer = client.upload_part_copy(
                        Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number,
                        CopySource={"Bucket": self.bucket, "Key": self._full(src_key)},
                        CopySourceRange=f"bytes={start}-{end - 1}", **extra)
                    done.append({"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]})
                else:
                    stage = f"upload part {number}"
                    answer = client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                                PartNumber=number, Body=value)
                    done.append({"PartNumber": number, "ETag": answer["ETag"]})
            stage = "complete multipart upload"
            try:
                answer = client.complete_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                                          MultipartUpload={"Parts": done}, IfNoneMatch="*")
            except bx.ClientError as exc:
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                # 412: the key exists. 409 (ConditionalRequestConflict): a concurrent conditional
                # write is in flight; if the key is there now, that writer won.
                if status == 412 or (status == 409 and self.exists(key)):
                    raise _LostRace() from exc
                raise
            upload_id = None
            return self._still_ours(key, answer.get("ETag"))
        except _LostRace:
            return False
        except bx.ClientError as exc:
            if stage.startswith("copy") and exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                raise StorageError(f"storage {self.url}: the base object changed while {key} was stamped from it",
                                   "base objects are immutable; find what overwrote it") from exc
            raise self._boto_error(exc, stage, key) from exc
        except bx.ParamValidationError:
            raise  # a bug in this module, not a backend failure: keep the traceback
        except (bx.BotoCoreError, OSError, obx.BaseError) as exc:
            raise self._boto_error(exc, stage, key) from exc
        finally:
            if upload_id is not None:
                try:
                    client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
                except Exception as exc:  # noqa: BLE001 - best effort; a lifecycle rule cleans up the rest
                    log.debug(f"storage {self.url}: abort of upload {upload_id} for {key} failed: {exc}")

    def _still_ours(self, key: str, etag: str | None) -> bool:
        """After a 200 from a conditional Complete: is the stored object the one we completed?

        Amazon S3 evaluates If-None-Match atomically. SeaweedFS 4.48 does not on
        CompleteMultipartUpload: of 8 concurrent completes, up to 6 answered 200, the last one
        written winning. Comparing ETags leaves one writer reporting created=True, the one whose
        object is stored."""
        if not etag:
            return True
        try:
            stored = self.head(key).etag
        except StorageError:
            return True  # the backend said created; a failed check does not say otherwise
        if stored is None or _bare(stored) == _bare(etag):
            return True
        log.debug(f"storage {self.url}: {key} was replaced right after our conditional complete "
                  "(the backend does not enforce If-None-Match atomically); using the stored object")
        return False

    # -- writes -------------------------------------------------------------------------------

    def put_if_absent(self, key: str, data: bytes | bytearray | memoryview | Path) -> PutResult:
        validate_key(key)  # before any read: a bad key is refused with nothing done
        if isinstance(data, Path):
            with self._errors("put", key):
                size = data.stat().st_size
            if size <= MULTIPART_THRESHOLD:
                with self._errors("put", key):
                    data = data.read_bytes()
            else:
                return self._put_large_file(key, data, size)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("put_if_absent takes bytes or a pathlib.Path")
        view = memoryview(data)
        sha = hashlib.sha256(view).hexdigest()
        if view.nbytes > MULTIPART_THRESHOLD:
            if self.exists(key):
                return PutResult(False, key, sha, view.nbytes)
            chunks = (("bytes", bytes(view[i:i + PART_SIZE])) for i in range(0, view.nbytes, PART_SIZE))
            return PutResult(self._multipart(key, chunks), key, sha, view.nbytes)
        return PutResult(self._create(key, view), key, sha, view.nbytes)

    def _put_large_file(self, key: str, path: Path, size: int) -> PutResult:
        digest = hashlib.sha256()
        if self.exists(key):
            with self._errors("read", str(path)), open(path, "rb") as f:
                while chunk := f.read(PART_SIZE):
                    digest.update(chunk)
            return PutResult(False, key, digest.hexdigest(), size)

        def chunks() -> Iterator[tuple[str, object]]:
            with open(path, "rb") as f:
                while chunk := f.read(PART_SIZE):
                    digest.update(chunk)
                    yield "bytes", chunk

        created = self._multipart(key, chunks())
        return PutResult(created, key, digest.hexdigest(), size)

    def put_pieces_if_absent(self, key: str, base_key: str, pieces: Sequence) -> StampResult:
        """Server-side: copy the base's unchanged ranges (UploadPartCopy), upload only the parts
        that hold changed bytes, complete with If-None-Match. See `pieces.plan_parts`."""
        existing = self._existing_stamp(key)
        if existing is not None:
            return existing
        base, segs = self._segments(base_key, pieces)
        size = pc.output_size(segs)
        plan = pc.plan_parts(segs)
        stats = {"uploaded": 0, "copied": 0, "downloaded": 0}

        def parts() -> Iterator[tuple[str, object]]:
            for part in plan:
                if part.is_copy:
                    stats["copied"] += part.size
                    yield "copy", (base_key, base.etag, part.copy_from, part.copy_from + part.size)
                else:
                    data, read = self._read_output(base, segs, part.start, part.end)
                    stats["uploaded"] += len(data)
                    stats["downloaded"] += read
                    yield "bytes", data

        if size == 0:
            raise StorageError(f"the stamp for {key} is empty", "a stamp needs at least one piece")
        created = self._multipart(key, parts())
        log.debug(f"storage {self.url}: stamped {key} from {base_key}: {len(plan)} parts, "
                  f"{stats['uploaded']} bytes uploaded, {stats['copied']} copied server-side, "
                  f"{stats['downloaded']} read back, created={created}")
        return StampResult(created, key, size, None, bytes_uploaded=stats["uploaded"],
                           bytes_copied=stats["copied"], bytes_downloaded=stats["downloaded"], parts=len(plan))

    def presigned_url(self, key: str, expires_s: int) -> str:
        return self._sign_with_obstore(key, expires_s)


def _bare(etag: str) -> str:
    return etag.removeprefix("W/").strip('"')
