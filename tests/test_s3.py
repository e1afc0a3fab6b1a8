"""S3 upload/download against a real S3-protocol server (moto in server mode on 127.0.0.1)."""
from __future__ import annotations

import logging
import time
import uuid

import numpy as np
import pytest
from servers import moto_server, s3_env  # noqa: F401  (pytest fixtures)

from tailor.export import S3Config, S3Error, download_repository, parse_s3_url, s3_client, triton_repository_url, upload_repository

SETTINGS = S3Config(max_attempts=2, connect_timeout_s=2.0, read_timeout_s=10.0)


@pytest.fixture
def repo_dir(tmp_path):
    root = tmp_path / "repo"
    (root / "m1" / "1").mkdir(parents=True)
    (root / "m1" / "config.pbtxt").write_text('name: "m1"\n')
    (root / "m1" / "labels.txt").write_text("a\nb\n")
    (root / "m1" / "1" / "model.onnx").write_bytes(np.random.default_rng(0).bytes(300_000))
    (root / "m2" / "1").mkdir(parents=True)
    (root / "m2" / "config.pbtxt").write_text('name: "m2"\n')
    (root / "m2" / "1" / "model.onnx").write_bytes(b"\x00" * 10)
    # Litter the uploader must skip: bytecode caches and a writer's in-progress temp dir.
    (root / "m2" / "1" / "__pycache__").mkdir()
    (root / "m2" / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"pyc")
    (root / ".m3.abc.tmp").mkdir()
    (root / ".m3.abc.tmp" / "config.pbtxt").write_text("partial")
    return root


EXPECTED = ["m1/1/model.onnx", "m1/config.pbtxt", "m1/labels.txt", "m2/1/model.onnx", "m2/config.pbtxt"]


@pytest.fixture
def bucket(s3_env):
    client = s3_client(SETTINGS)
    name = f"tailor-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return client, name


def all_keys(client, bucket):
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


class FailingClient:
    """A real client whose `method` raises on its `fail_on`-th call (a failure mid-way)."""

    def __init__(self, client, method, fail_on, error=ConnectionError("simulated network drop")):
        self._client, self._method, self._fail_on, self._error = client, method, fail_on, error
        self.calls = 0

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if name != self._method:
            return attr

        def wrapped(*args, **kwargs):
            self.calls += 1
            if self.calls == self._fail_on:
                raise self._error
            return attr(*args, **kwargs)

        return wrapped


# ---------------------------------------------------------------- happy paths
def test_roundtrip_upload_download(repo_dir, bucket, tmp_path):
    client, name = bucket
    keys = upload_repository(repo_dir, f"s3://{name}/models/repo", client)
    assert sorted(keys) == [f"models/repo/{k}" for k in EXPECTED]
    assert all_keys(client, name) == sorted(keys)  # staging is gone, litter was skipped

    out = tmp_path / "down"
    paths = download_repository(f"s3://{name}/models/repo", out, client)
    assert sorted(p.relative_to(out).as_posix() for p in paths) == EXPECTED
    for rel in EXPECTED:
        assert (out / rel).read_bytes() == (repo_dir / rel).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["down", "repo"]  # no temp dir left


def test_overwrite_replaces_whole_repository(repo_dir, bucket):
    client, name = bucket
    url = f"s3://{name}/repo"
    upload_repository(repo_dir, url, client)
    with pytest.raises(S3Error, match="not empty"):
        upload_repository(repo_dir, url, client)
    assert len(all_keys(client, name)) == len(EXPECTED)  # refused: the first upload is intact

    (repo_dir / "m2" / "config.pbtxt").unlink()
    (repo_dir / "m1" / "labels.txt").write_text("a\nb\nc\n")
    upload_repository(repo_dir, url, client, overwrite=True)
    assert all_keys(client, name) == [f"repo/{k}" for k in EXPECTED if k != "m2/config.pbtxt"]
    body = client.get_object(Bucket=name, Key="repo/m1/labels.txt")["Body"].read()
    assert body == b"a\nb\nc\n"


# ---------------------------------------------------------------- complete or absent
def test_missing_bucket_fails_fast_and_cleanly(repo_dir, s3_env):
    client = s3_client(SETTINGS)
    start = time.monotonic()
    with pytest.raises(S3Error, match="NoSuchBucket"):
        upload_repository(repo_dir, "s3://no-such-bucket-tailor/repo", client)
    assert time.monotonic() - start < 20  # bounded retries, no hang


@pytest.mark.parametrize("method, fail_on", [("put_object", 3), ("copy_object", 2), ("copy_object", 5)])
def test_failure_midway_leaves_nothing(repo_dir, bucket, method, fail_on):
    client, name = bucket
    failing = FailingClient(client, method, fail_on)
    with pytest.raises(S3Error, match="simulated network drop"):
        upload_repository(repo_dir, f"s3://{name}/repo", failing)
    assert failing.calls == fail_on  # it really failed mid-way, after some objects were written
    assert all_keys(client, name) == []  # neither final nor staging objects remain


def test_failed_overwrite_leaves_prefix_absent_not_mixed(repo_dir, bucket):
    client, name = bucket
    upload_repository(repo_dir, f"s3://{name}/repo", client)
    (repo_dir / "m1" / "labels.txt").write_text("new\nlabels\n")
    with pytest.raises(S3Error):
        upload_repository(repo_dir, f"s3://{name}/repo", FailingClient(client, "copy_object", 3), overwrite=True)
    assert all_keys(client, name) == []


def test_verification_catches_a_wrong_object(repo_dir, bucket):
    client, name = bucket

    class LyingHead(FailingClient):
        def __getattr__(self, attr):
            if attr != "head_object":
                return getattr(self._client, attr)

            def head(**kw):
                out = dict(self._client.head_object(**kw))
                out["ContentLength"] += 1  # as if the object were truncated/extended in transit
                return out

            return head

    with pytest.raises(S3Error, match="size/etag"):
        upload_repository(repo_dir, f"s3://{name}/repo", LyingHead(client, "head_object", 0))
    assert all_keys(client, name) == []


# ---------------------------------------------------------------- environment and URLs
def test_client_reads_environment_only_and_never_logs_secrets(repo_dir, s3_env, monkeypatch, caplog):
    client = s3_client(SETTINGS)
    assert client.meta.endpoint_url == s3_env.endpoint_url
    assert client.meta.config.retries == {"total_max_attempts": 2, "mode": "standard"}
    client.create_bucket(Bucket="logcheck")
    with caplog.at_level(logging.DEBUG):
        upload_repository(repo_dir, "s3://logcheck/repo", client)
    assert s3_env.env["AWS_SECRET_ACCESS_KEY"] not in caplog.text

    monkeypatch.setenv("AWS_CONFIG_FILE", str(repo_dir / "no-such-config"))  # no region from ~/.aws
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(S3Error, match="AWS_SECRET_ACCESS_KEY is not set but its pair is") as err:
        s3_client(SETTINGS)  # half a key pair never falls through to another identity
    assert s3_env.env["AWS_ACCESS_KEY_ID"] not in str(err.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(S3Error, match="AWS_DEFAULT_REGION"):
        s3_client(SETTINGS)


def _no_static_keys(monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role probe from a test


def test_client_takes_a_web_identity_as_on_eks_irsa(repo_dir, s3_env, monkeypatch, tmp_path):
    """IRSA's variables and no keys: boto3's chain calls STS AssumeRoleWithWebIdentity (on the test
    server, which issues temporary credentials) and the upload runs under them."""
    _no_static_keys(monkeypatch, tmp_path)
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl")  # what the projected service-account token looks like
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/tailor-export")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
    client = s3_client(SETTINGS)
    creds = client._request_signer._credentials
    assert creds.method == "assume-role-with-web-identity"
    assert creds.get_frozen_credentials().access_key not in (None, "", s3_env.env["AWS_ACCESS_KEY_ID"])
    client.create_bucket(Bucket="irsa")
    assert upload_repository(repo_dir, "s3://irsa/repo", client)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(tmp_path / "missing-token"))
    with pytest.raises(Exception, match="missing-token"):
        s3_client(SETTINGS).list_buckets()


def test_client_takes_a_named_profile_and_refuses_no_credentials(repo_dir, s3_env, monkeypatch, tmp_path):
    _no_static_keys(monkeypatch, tmp_path)
    with pytest.raises(S3Error, match="no AWS credentials found"):
        s3_client(SETTINGS)
    (tmp_path / "no-credentials").write_text("[tailor]\naws_access_key_id = profile-key\n"
                                             "aws_secret_access_key = profile-secret\n")
    monkeypatch.setenv("AWS_PROFILE", "tailor")
    client = s3_client(SETTINGS)
    assert client._request_signer._credentials.access_key == "profile-key"
    client.create_bucket(Bucket="profile")
    assert upload_repository(repo_dir, "s3://profile/repo", client)


def test_download_refuses_existing_dir_and_empty_prefix(bucket, tmp_path):
    client, name = bucket
    with pytest.raises(S3Error, match="no objects"):
        download_repository(f"s3://{name}/nothing", tmp_path / "x", client)
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileExistsError):
        download_repository(f"s3://{name}/nothing", tmp_path, client)


def test_url_parsing():
    assert parse_s3_url("s3://b/p/q/").prefix == "p/q"
    for bad in ("s3://b", "s3://b/", "http://b/p", "b/p", "s3://b/.tailor-staging/x"):
        with pytest.raises(ValueError):
            parse_s3_url(bad)
    assert triton_repository_url("s3://b/p", "http://127.0.0.1:9000") == "s3://127.0.0.1:9000/b/p"
    assert triton_repository_url("s3://b/p", "https://minio.local:443") == "s3://https://minio.local:443/b/p"
    assert triton_repository_url("s3://b/p", "") == "s3://b/p"
