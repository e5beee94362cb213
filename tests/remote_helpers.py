"""A real S3-compatible server for the remote-cache tests: moto's server mode on 127.0.0.1, a free port, this
process's environment pointing at it the standard way (AWS_* variables only; nothing read from ~/.aws or an
instance metadata service). Used by tests/test_remote_*.py."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import pytest

BUCKET = "kd-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aws_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
    }


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server for the module, with bucket ``BUCKET``; yields a boto3 client (``.endpoint``: its URL)."""
    moto_server = pytest.importorskip("moto.server", reason="the [remote] extra (moto[server]) runs these tests")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs", reason="s3:// needs the [remote] extra (s3fs)")
    from kdcli.cache import storage

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(k)
        for k, v in aws_env(endpoint).items():
            mp.setenv(k, v)
        storage.forget_filesystems()
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket=BUCKET)
        client.endpoint = endpoint
        yield client
        storage.forget_filesystems()
    server.stop()


def upload(client, local: Path, prefix: str) -> str:
    """Every file of a local cache directory as objects under ``prefix`` (boto3: independent of kdcli)."""
    for p in sorted(local.iterdir()):
        if p.is_file():
            client.put_object(Bucket=BUCKET, Key=f"{prefix}/{p.name}", Body=p.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


def objects(client, prefix: str) -> dict[str, bytes]:
    """Object name (under ``prefix``) -> bytes."""
    out = {}
    for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/").get("Contents", []):
        out[o["Key"][len(prefix) + 1 :]] = client.get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
    return out


def blob_teacher(d: Path) -> None:
    """``d/blobs.npz`` (600 rows of conftest's blobs) and ``d/teacher``, an MLP trained on them for one epoch: the
    classification teacher the remote tests cache."""
    import numpy as np
    from conftest import make_blobs

    from kdcli.config import TrainConfig
    from kdcli.stages.train import train_student

    x, y = make_blobs(600)
    np.savez(d / "blobs.npz", x=x, y=y)
    train_student(
        TrainConfig(
            student="mlp",
            student_args={"hidden": [16]},
            data=str(d / "blobs.npz"),
            out=str(d / "teacher"),
            epochs=1,
            lr=3e-3,
            seed=0,
        )
    )
