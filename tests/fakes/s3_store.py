"""A real S3 API on 127.0.0.1: moto's server (``moto[server]``), in memory, on a free port.

Every S3 call the artifacts code makes (s3fs over aiobotocore) goes over HTTP
to it, signed with the fake keys in `S3Server.env`, exactly as to AWS or
MinIO. A test process starts one and a Ray job on the same machine (and in
the same network namespace, see tests/ray_cluster) reaches it too.
"""

from __future__ import annotations

import uuid
from typing import Self

REGION = "us-east-1"
KEY_ID = "AKIATUNEBOTTESTKEY01"  # moto accepts any key; these look like a real pair's shape
SECRET_KEY = "tunebot-test-secret-access-key-0000000000"


class S3Server:
    """``with S3Server() as s3:`` serves until the block ends; `env` points botocore at it."""

    def __init__(self) -> None:
        self._server = None
        self.endpoint = ""

    def start(self) -> Self:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        self._server = server
        self.endpoint = f"http://{host}:{port}"
        return self

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables for this server (what a deployment sets for its store)."""
        return {
            "AWS_ACCESS_KEY_ID": KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }

    def client(self):
        """A boto3 S3 client of this server (for a test's own setup and checks)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def bucket(self) -> str:
        """A new, empty bucket's name."""
        name = f"tunebot-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under `prefix`, sorted."""
        found = []
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        for page in pages:
            found += [o["Key"] for o in page.get("Contents", [])]
        return sorted(found)

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
