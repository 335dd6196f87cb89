"""A local S3 server (moto's server mode, on the loopback address) as a DVC remote, and the
environment DVC commands reach it with.

The fake credentials live only in the environment of the commands a test starts: nothing
committed in a test's repository holds more than the bucket's URL and endpoint.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qlora.core.io import pipeline_env

BUCKET = "qlora-dvc"
PREFIX = "store"  # the remote is a folder of the bucket, as teams share one bucket
# What a user exports (or keeps in an AWS profile); moto accepts any key.
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def aws_env(home: Path, credentials: bool = True) -> dict[str, str]:
    """The environment of a DVC command: the fake keys (or none), and no AWS setting of the
    machine's own (a profile, config files, the instance metadata service) that could reach
    a real account or stall a test."""
    env = {k: v for k, v in pipeline_env().items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(home / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(home / "aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    if credentials:
        env.update(FAKE_CREDENTIALS)
    return env


def run(cwd: Path, env: dict[str, str], *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def dvc(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return run(cwd, env, sys.executable, "-m", "dvc", *args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Remote:
    endpoint: str
    home: Path  # holds the (absent) AWS config files

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=FAKE_CREDENTIALS["AWS_DEFAULT_REGION"],
        )

    def keys(self) -> set[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        return {obj["Key"] for page in pages for obj in page.get("Contents", [])}

    @property
    def env(self) -> dict[str, str]:
        return aws_env(self.home)

    def add_to(self, work: Path) -> None:
        """This bucket as the default DVC remote of `work` (in .dvc/config, to commit)."""
        for args in (
            ("remote", "add", "--default", "store", f"s3://{BUCKET}/{PREFIX}"),
            ("remote", "modify", "store", "endpointurl", self.endpoint),
        ):
            done = dvc(work, self.env, *args)
            assert done.returncode == 0, done.stderr


@contextlib.contextmanager
def moto_s3(home: Path) -> Iterator[Remote]:
    """moto's S3 server in a thread of this process, on a free loopback port, one bucket;
    stopped on the way out, however the block ends."""
    from moto.server import ThreadedMotoServer

    # One line per request otherwise, in the output of every test that prints (`-s`).
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        remote = Remote(f"http://{host}:{port}", home)
        remote.client().create_bucket(Bucket=BUCKET)
        yield remote
    finally:
        server.stop()
