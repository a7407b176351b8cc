"""The object stores the remote store (remote.py) writes to: a shared filesystem
(``file:///path``) or any S3-compatible store (``s3://bucket/prefix``) through boto3, the
same client code for AWS, MinIO, Ceph or the test suite's moto server. Each failure is a
named error: StoreFailed (unreachable, no such bucket, credentials refused), NotFound.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from llmux.common.errors import Cancelled, HostError, InvalidArgument, NotFound, StoreFailed
from llmux.service.core.config import RemoteConfig
from llmux.service.core.durable import fsync_dir

CHUNK = 8 << 20
"""How much is read, written or hashed at a time."""

Cancel = Callable[[], bool]
"""True once the work should stop (a newer dump superseded the upload)."""


class Backend(Protocol):
    """The few object-store operations the remote store needs; keys are relative to the
    store's URL."""

    @property
    def url(self) -> str: ...

    def put_file(self, key: str, path: Path, cancelled: Cancel) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def read_chunks(self, key: str) -> Iterator[bytes]: ...
    def list_keys(self, prefix: str) -> list[str]: ...
    def delete_keys(self, keys: list[str]) -> None: ...


# ------------------------------------------------------------------------- file://


@dataclass
class FileBackend:
    """A shared filesystem (NFS, CephFS, a PVC): each object a file, written under a
    temporary name and renamed, so that a reader never sees half of one."""

    root: Path

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def _reachable(self) -> None:
        if not self.root.is_dir():
            raise StoreFailed(f"the store {self.url} is unreachable: {self.root} is not a "
                              "directory (not mounted?)")

    def _write(self, key: str, fill: Callable[[Any], None]) -> None:
        self._reachable()
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = target.parent / f".part-{target.name}-{secrets.token_hex(4)}"
            try:
                with open(tmp, "wb") as out:
                    os.fchmod(out.fileno(), 0o600)
                    fill(out)
                    out.flush()
                    os.fsync(out.fileno())
                os.rename(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            fsync_dir(target.parent)
        except OSError as exc:
            raise StoreFailed(f"writing {key} to the store {self.url} failed: {exc}") from exc

    def put_file(self, key: str, path: Path, cancelled: Cancel) -> None:
        def fill(out: Any) -> None:
            with open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    if cancelled():
                        raise Cancelled(f"upload of {key} superseded")
                    out.write(chunk)

        self._write(key, fill)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._write(key, lambda out: out.write(data))

    def get_bytes(self, key: str) -> bytes:
        self._reachable()
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{key} is not in the store {self.url}") from None
        except OSError as exc:
            raise StoreFailed(f"reading {key} from the store {self.url} failed: {exc}") from exc

    def read_chunks(self, key: str) -> Iterator[bytes]:
        self._reachable()
        try:
            with open(self._path(key), "rb") as src:
                while chunk := src.read(CHUNK):
                    yield chunk
        except FileNotFoundError:
            raise NotFound(f"{key} is not in the store {self.url}") from None
        except OSError as exc:
            raise StoreFailed(f"reading {key} from the store {self.url} failed: {exc}") from exc

    def list_keys(self, prefix: str) -> list[str]:
        self._reachable()
        base = self._path(prefix) if prefix else self.root
        found = []
        for dirpath, _dirs, names in os.walk(base):
            for name in names:
                if not name.startswith(".part-"):
                    found.append(os.path.relpath(os.path.join(dirpath, name), self.root))
        return sorted(found)

    def delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self._path(key).unlink()
        # empty folders left behind
        for key in keys:
            parent = self._path(key).parent
            while parent != self.root and parent.is_relative_to(self.root):
                try:
                    parent.rmdir()
                except OSError:
                    break
                parent = parent.parent


# ------------------------------------------------------------------------------- s3://


_CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                     "InvalidToken", "ExpiredToken", "AuthorizationHeaderMalformed")


class S3Backend:
    """An S3-compatible store through boto3."""

    def __init__(self, config: RemoteConfig) -> None:
        try:
            import boto3
            import botocore.config
            import botocore.session
        except ImportError:
            raise InvalidArgument(
                f"remote.url {config.url} needs boto3, which is not installed "
                "(apt install python3-boto3, or pip install boto3)") from None

        for name in ("botocore", "boto3", "s3transfer", "urllib3"):  # their debug is a flood
            logging.getLogger(name).setLevel(max(logging.INFO, logging.root.level))
        parsed = urlparse(config.url)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.url = config.url
        session = botocore.session.Session()
        if config.credentials_file:
            session.set_config_variable("credentials_file", config.credentials_file)
            session.set_config_variable("config_file", config.credentials_file)
        self.client: Any = boto3.Session(botocore_session=session).client(
            "s3",
            endpoint_url=config.endpoint_url or None,
            region_name=config.region or None,
            config=botocore.config.Config(
                connect_timeout=5, read_timeout=60,
                retries={"max_attempts": 2, "mode": "standard"},
            ),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, what: str, key: str = "") -> Iterator[None]:
        """botocore's (and boto3's transfer) exceptions as the service's named errors."""
        import boto3.exceptions
        import botocore.exceptions as bce

        try:
            yield
        except Cancelled:
            raise
        except boto3.exceptions.S3UploadFailedError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, (bce.ClientError, bce.BotoCoreError)):
                raise self._translate(what, key, cause) from None
            raise StoreFailed(f"{what} failed: {exc} (store {self.url})") from None
        except (bce.ClientError, bce.BotoCoreError, OSError) as exc:
            raise self._translate(what, key, exc) from None

    def _translate(self, what: str, key: str, exc: Exception) -> HostError:
        import botocore.exceptions as bce

        if isinstance(exc, bce.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            message = err.get("Message", "") or str(exc)
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFound(f"{key} is not in the store {self.url}")
            if code == "NoSuchBucket":
                return StoreFailed(f"{what} failed: the bucket {self.bucket!r} does not exist "
                                   f"(store {self.url})")
            if code in _CREDENTIAL_CODES:
                return StoreFailed(f"{what} failed: the store {self.url} refused the "
                                   f"credentials ({code}: {message})")
            return StoreFailed(f"{what} failed: {code}: {message} (store {self.url})")
        if isinstance(exc, OSError) and exc.filename:  # the local file, not the store
            return StoreFailed(f"{what} failed: {exc}")
        if isinstance(exc, bce.NoCredentialsError):
            return StoreFailed(f"{what} failed: no credentials for the store {self.url} (set "
                               "remote.credentials_file or the AWS environment)")
        return StoreFailed(f"{what} failed: the store {self.url} is unreachable: {exc}")

    def put_file(self, key: str, path: Path, cancelled: Cancel) -> None:
        from boto3.s3.transfer import TransferConfig

        def step(_n: int) -> None:
            if cancelled():
                raise Cancelled(f"upload of {key} superseded")

        with self._errors(f"uploading {key}", key):
            self.client.upload_file(
                str(path), self.bucket, self._key(key), Callback=step,
                Config=TransferConfig(multipart_chunksize=CHUNK, max_concurrency=4))

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors(f"uploading {key}", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get_bytes(self, key: str) -> bytes:
        with self._errors(f"reading {key}", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            data: bytes = body.read()
            return data

    def read_chunks(self, key: str) -> Iterator[bytes]:
        with self._errors(f"downloading {key}", key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

    def list_keys(self, prefix: str) -> list[str]:
        found = []
        start = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        with self._errors("listing the store"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start)
            for page in pages:
                for obj in page.get("Contents", []):
                    key = str(obj["Key"])
                    found.append(key[len(self.prefix) + 1:] if self.prefix else key)
        return sorted(found)

    def delete_keys(self, keys: list[str]) -> None:
        with self._errors("deleting from the store"):
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": [{"Key": self._key(k)} for k in keys[i:i + 1000]],
                    "Quiet": True})


def check_credentials_file(path: str) -> None:
    """The credentials file exists, is a regular file, and only its owner, root, reads it."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InvalidArgument(f"remote.credentials_file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"remote.credentials_file {path} is not a regular file")
    if st.st_mode & 0o077 or (os.geteuid() == 0 and st.st_uid != 0):
        raise InvalidArgument(
            f"remote.credentials_file {path} must be root-only (owner uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}): chown root and chmod 600 it")


def backend_for(config: RemoteConfig) -> Backend:
    if config.url.startswith("file://"):
        return FileBackend(Path(urlparse(config.url).path))
    if config.credentials_file:
        check_credentials_file(config.credentials_file)
    return S3Backend(config)
