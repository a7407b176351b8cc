"""A local S3 server for the remote-store tests and benchmark: moto in server mode.

None of MinIO, SeaweedFS or Garage installs on the test machines; moto (PyPI) speaks the
S3 protocol over HTTP on loopback, so the client code under test (boto3 in
service/core/remote.py) is the same that runs against AWS, MinIO or Ceph. It keeps its
objects in memory: killed, it forgets them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.procs import free_port

MOTO = Path(sys.prefix) / "bin" / "moto_server"
KEY_ID = "llmuxtest"
SECRET = "llmuxtestsecret"


def client(endpoint: str, key_id: str = KEY_ID, secret: str = SECRET) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key_id,
                        aws_secret_access_key=secret, region_name="us-east-1")


@dataclass
class MotoServer:
    """``moto_server`` on a loopback port; ``auth``: IAM checks on (moto accepts any key
    otherwise), with one user whose keys are ``key_id``/``secret``."""

    auth: bool = False
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    key_id: str = KEY_ID
    secret: str = SECRET

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        if not MOTO.exists():
            import pytest

            pytest.skip(f"{MOTO} is missing: pip install 'moto[server]' (the test extra)")
        env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
        if self.auth:
            # the first three calls (the user, its key, its policy) go through unchecked
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        self.proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{self.endpoint}/moto-api/", timeout=1, trust_env=False)
                break
            except httpx.HTTPError as exc:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}") from exc
                time.sleep(0.1)
        if self.auth:
            self._make_user()
        return self

    def _make_user(self) -> None:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, aws_access_key_id=KEY_ID,
                           aws_secret_access_key=SECRET, region_name="us-east-1")
        iam.create_user(UserName="llmux")
        key = iam.create_access_key(UserName="llmux")["AccessKey"]
        iam.put_user_policy(UserName="llmux", PolicyName="s3", PolicyDocument=(
            '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", '
            '"Resource": "*"}]}'))
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def client(self) -> Any:
        return client(self.endpoint, self.key_id, self.secret)

    def bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def credentials_file(self, path: Path, key_id: str | None = None,
                         secret: str | None = None) -> Path:
        """A root-only AWS shared-credentials file with this server's (or other) keys."""
        path.write_text(f"[default]\naws_access_key_id = {key_id or self.key_id}\n"
                        f"aws_secret_access_key = {secret or self.secret}\n"
                        "region = us-east-1\n")
        path.chmod(0o600)
        return path
