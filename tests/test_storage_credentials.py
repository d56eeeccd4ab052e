"""Credentials and regions as a cluster has them: a profile file, temporary (STS) keys with a
session token, buckets in other regions. Against moto's S3 + STS + IAM server with request
authentication switched on, so a request without valid credentials is refused."""

from __future__ import annotations

import json
import urllib.request
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from damo.config.schema import S3Config
from damo.storage import Reason, Storage, StorageError

BUCKET = "creds-bucket"
EU_BUCKET = "eu-west-bucket"
ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)
TRUST_ANYONE = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
    }
)


def _set_moto_auth(endpoint: str, initial_unauthenticated_requests: str) -> None:
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=initial_unauthenticated_requests.encode(),
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@pytest.fixture(scope="module")
def sts_server():
    """(endpoint, IAM user keys, assumed-role keys with their session token)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    admin = {
        "endpoint_url": endpoint,
        "region_name": "us-east-1",
        "aws_access_key_id": "admin",
        "aws_secret_access_key": "admin",
    }
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="damo")
    iam.put_user_policy(UserName="damo", PolicyName="all", PolicyDocument=ALLOW_ALL)
    key = iam.create_access_key(UserName="damo")["AccessKey"]
    role = iam.create_role(RoleName="damo-worker", AssumeRolePolicyDocument=TRUST_ANYONE)
    iam.put_role_policy(RoleName="damo-worker", PolicyName="all", PolicyDocument=ALLOW_ALL)
    s3 = boto3.client("s3", **admin)
    s3.create_bucket(Bucket=BUCKET)
    s3.create_bucket(
        Bucket=EU_BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )
    _set_moto_auth(endpoint, "0")  # from now on every request must be signed by a known key
    try:
        user = (key["AccessKeyId"], key["SecretAccessKey"])
        sts = boto3.client(
            "sts",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=user[0],
            aws_secret_access_key=user[1],
        )
        temp = sts.assume_role(RoleArn=role["Role"]["Arn"], RoleSessionName="worker")
        creds = temp["Credentials"]
        yield (
            endpoint,
            user,
            (creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"]),
        )
    finally:
        _set_moto_auth(endpoint, "inf")
        server.stop()


@pytest.fixture
def no_aws_env(monkeypatch, tmp_path):
    """No AWS_* credentials, profiles or regions from the machine running the tests."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "DAMO_S3_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probing
    return monkeypatch


def _round_trip(storage: Storage, root: str) -> None:
    """Objects through boto3, and a Parquet file written and read through pyarrow."""
    storage.write_bytes(f"{root}/hello.txt", b"hi")
    assert storage.read_bytes(f"{root}/hello.txt") == b"hi"
    fs, path = storage.pyarrow_filesystem(f"{root}/table/part-0.parquet")
    pq.write_table(pa.table({"x": [1, 2, 3]}), path, filesystem=fs)
    fs, paths = storage.parquet_files(f"{root}/table")
    assert pq.read_table(paths[0], filesystem=fs).column("x").to_pylist() == [1, 2, 3]
    listed = {info.uri: info.size for info in storage.list_objects(root + "/")}
    assert listed[f"{root}/hello.txt"] == 2 and f"{root}/table/part-0.parquet" in listed


def test_moto_refuses_unknown_keys(sts_server, no_aws_env):
    """The control: authentication is really on, for boto3 and for pyarrow alike."""
    endpoint, (key_id, _), _ = sts_server
    bad = Storage(S3Config(endpoint_url=endpoint, access_key_id=key_id, secret_access_key="no"))
    with pytest.raises(StorageError) as err:
        bad.write_bytes(f"s3://{BUCKET}/x", b"x")
    assert err.value.reason is Reason.AUTH
    fs, path = bad.pyarrow_filesystem(f"s3://{BUCKET}/x.parquet")
    with pytest.raises(OSError):
        pq.write_table(pa.table({"x": [1]}), path, filesystem=fs)


def test_credentials_only_in_a_profile_file(sts_server, no_aws_env, tmp_path):
    endpoint, (key_id, secret), _ = sts_server
    credentials = tmp_path / "credentials"
    credentials.write_text(
        f"[default]\naws_access_key_id = wrong\naws_secret_access_key = wrong\n\n"
        f"[damo]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
    )
    no_aws_env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    no_aws_env.setenv("AWS_PROFILE", "damo")
    storage = Storage(S3Config(endpoint_url=endpoint))
    assert storage.s3.access_key_id is None and storage.s3.secret_access_key is None
    _round_trip(storage, f"s3://{BUCKET}/{uuid.uuid4().hex}")


def test_temporary_keys_with_a_session_token(sts_server, no_aws_env):
    endpoint, _, (key_id, secret, token) = sts_server
    explicit = S3Config(
        endpoint_url=endpoint,
        access_key_id=key_id,
        secret_access_key=SecretStr(secret),
        session_token=SecretStr(token),
    )
    _round_trip(Storage(explicit), f"s3://{BUCKET}/{uuid.uuid4().hex}")
    # the same keys without their token are refused: the token is what made them work
    tokenless = Storage(explicit.model_copy(update={"session_token": None}))
    with pytest.raises(StorageError) as err:
        tokenless.write_bytes(f"s3://{BUCKET}/{uuid.uuid4().hex}", b"x")
    assert err.value.reason is Reason.AUTH


def test_temporary_keys_from_the_environment(sts_server, no_aws_env):
    """The chain picks up AWS_SESSION_TOKEN; keys in the env are not copied into the config."""
    endpoint, _, (key_id, secret, token) = sts_server
    no_aws_env.setenv("AWS_ACCESS_KEY_ID", key_id)
    no_aws_env.setenv("AWS_SECRET_ACCESS_KEY", secret)
    no_aws_env.setenv("AWS_SESSION_TOKEN", token)
    storage = Storage(S3Config(endpoint_url=endpoint))
    assert storage.s3.access_key_id is None
    _round_trip(storage, f"s3://{BUCKET}/{uuid.uuid4().hex}")
    # keys configured explicitly that equal the env's take the env's session token too
    explicit = Storage(
        S3Config(endpoint_url=endpoint, access_key_id=key_id, secret_access_key=secret)
    )
    _round_trip(explicit, f"s3://{BUCKET}/{uuid.uuid4().hex}")


def test_bucket_in_another_region_is_read_through_pyarrow(sts_server, no_aws_env):
    endpoint, (key_id, secret), _ = sts_server
    storage = Storage(
        S3Config(endpoint_url=endpoint, access_key_id=key_id, secret_access_key=secret)
    )
    assert storage.s3.region is None
    assert storage.bucket_region(EU_BUCKET) == "eu-west-1"
    root = f"s3://{EU_BUCKET}/{uuid.uuid4().hex}"
    _round_trip(storage, root)
    fs, _ = storage.pyarrow_filesystem(root)
    assert fs.region == "eu-west-1"  # moto serves any region; real S3 answers 301 otherwise
    fs, _ = storage.pyarrow_filesystem(f"s3://{BUCKET}/x")
    assert fs.region == "us-east-1"


def test_region_from_the_environment(no_aws_env):
    no_aws_env.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert Storage().s3.region == "ap-south-1"
    no_aws_env.setenv("AWS_REGION", "eu-central-1")  # the newer name wins, as in the SDKs
    storage = Storage()
    assert storage.s3.region == "eu-central-1"
    assert storage.client.meta.region_name == "eu-central-1"
    assert Storage(S3Config(region="us-west-2")).s3.region == "us-west-2"


def test_half_configured_keys_are_a_clear_error(no_aws_env):
    storage = Storage(S3Config(endpoint_url="http://127.0.0.1:9", access_key_id="only-the-id"))
    with pytest.raises(StorageError) as err:
        storage.read_bytes("s3://b/k")
    assert err.value.reason is Reason.AUTH and "secret_access_key" in str(err.value)
