"""Upload / download a Triton model repository to / from S3 (or any S3-protocol server).

Credentials come from boto3's default chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and
AWS_SESSION_TOKEN) in the environment, else a web identity (AWS_ROLE_ARN and
AWS_WEB_IDENTITY_TOKEN_FILE: EKS IRSA, or any OIDC federation), a profile (AWS_PROFILE,
AWS_SHARED_CREDENTIALS_FILE), container credentials, or the node's instance profile. Endpoint
(AWS_ENDPOINT_URL) and region (AWS_DEFAULT_REGION / AWS_REGION, or the profile's) come from the
same places. Nothing is read from params, and no credential is ever logged.

An upload is complete or absent: objects go to a staging prefix, are verified (size and MD5
ETag), copied into the final prefix, verified again, and staging is removed. On any failure
everything written (staging and final) is deleted before the error is raised.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from .settings import S3Config

log = logging.getLogger(__name__)

STAGING_ROOT = ".tailor-staging"
# Single PUT limit of S3; repository files (ONNX of small networks, configs, labels) are far below
# it, and a single-part upload keeps the ETag equal to the MD5 we verify against.
MAX_OBJECT_BYTES = 5 * 1024**3
# Files a model repository never needs on the server.
_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".tmp")


class S3Error(RuntimeError):
    """An S3 transfer failed; for uploads, nothing was left under the final prefix."""


@dataclass(frozen=True)
class S3Url:
    bucket: str
    prefix: str  # no leading or trailing '/'

    def __str__(self):
        return f"s3://{self.bucket}/{self.prefix}"


def parse_s3_url(url: str) -> S3Url:
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"expected s3://bucket/prefix, got {url!r}")
    prefix = parsed.path.strip("/")
    if not prefix:
        # A prefix is required: the repository's objects are replaced as a whole, and the
        # staging area must lie outside it.
        raise ValueError(f"{url!r} needs a prefix below the bucket (s3://bucket/prefix)")
    if prefix.split("/")[0] == STAGING_ROOT:
        raise ValueError(f"prefix may not start with the staging area {STAGING_ROOT!r}")
    return S3Url(parsed.netloc, prefix)


def triton_repository_url(url: str, endpoint_url: str | None = None) -> str:
    """Triton's form of an S3 repository: s3://bucket/path, or s3://host:port/bucket/path for a
    non-AWS endpoint (Triton still reads credentials and region from AWS_* env vars)."""
    target = parse_s3_url(url)
    endpoint_url = endpoint_url if endpoint_url is not None else os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint_url:
        return str(target)
    ep = urlparse(endpoint_url)
    if not ep.hostname or not ep.port:
        raise ValueError("AWS_ENDPOINT_URL must be scheme://host:port for Triton's s3://host:port/ form")
    # Triton's S3 client treats an explicit host:port as plain HTTP unless the scheme is https.
    scheme = "https://" if ep.scheme == "https" else ""
    return f"s3://{scheme}{ep.hostname}:{ep.port}/{target.bucket}/{target.prefix}"


def s3_client(settings: S3Config):
    """A boto3 S3 client from the default credential chain, with bounded retries/timeouts.

    Half a static key pair is an error, not a fall-through to another identity: a typo in one of
    the two variables must not silently run as the node's role."""
    import boto3
    from botocore.config import Config

    key_id = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if bool(key_id) != bool(secret):
        missing = "AWS_SECRET_ACCESS_KEY" if key_id else "AWS_ACCESS_KEY_ID"
        raise S3Error(f"{missing} is not set but its pair is: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                      "or neither (to use a web identity, profile or instance role)")
    session = boto3.session.Session()
    creds = session.get_credentials()
    if creds is None:
        raise S3Error("no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_ROLE_ARN "
                      "and AWS_WEB_IDENTITY_TOKEN_FILE (IRSA), or AWS_PROFILE, or run where an instance role applies")
    if not session.region_name:
        raise S3Error("AWS_DEFAULT_REGION (or AWS_REGION, or a profile's region) must be set")
    config = Config(
        retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        # A custom endpoint (minio, moto, ceph) rarely serves virtual-host bucket names.
        s3={"addressing_style": "path"},
    )
    log.info("S3 credentials from %s", creds.method)  # the source (env, assume-role-with-web-identity, ...), no secret
    return session.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None, config=config)


# ---------------------------------------------------------------- helpers
def _local_files(local_dir: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(local_dir.rglob("*")):
        rel = path.relative_to(local_dir)
        if not path.is_file() or _SKIP_DIRS & set(rel.parts) or path.name.endswith(_SKIP_SUFFIXES):
            continue
        if any(part.startswith(".") for part in rel.parts):
            continue  # a writer's in-progress temp dir, or editor/OS litter
        files[rel.as_posix()] = path
    return files


def _md5(path: Path) -> tuple[str, str]:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest(), base64.b64encode(h.digest()).decode()


def _list(client, bucket: str, prefix: str) -> dict[str, dict]:
    """key -> {Size, ETag} for every object under prefix/ (bounded by S3 pagination)."""
    out = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = {"Size": obj["Size"], "ETag": obj["ETag"].strip('"')}
    return out


def _delete(client, bucket: str, keys) -> None:
    keys = list(keys)
    for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
        batch = [{"Key": k} for k in keys[i : i + 1000]]
        resp = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        if resp.get("Errors"):
            raise S3Error(f"could not delete {len(resp['Errors'])} objects, e.g. {resp['Errors'][0]}")


def _verify(client, bucket: str, prefix: str, expected: dict[str, tuple[int, str]]) -> None:
    """Every expected object is there with its size and MD5 ETag, and nothing else is."""
    found = _list(client, bucket, prefix)
    want = {f"{prefix}/{rel}": v for rel, v in expected.items()}
    if set(found) != set(want):
        missing, extra = sorted(set(want) - set(found)), sorted(set(found) - set(want))
        raise S3Error(f"s3://{bucket}/{prefix}: missing {missing[:5]}, unexpected {extra[:5]}")
    for key, (size, md5) in want.items():
        head = client.head_object(Bucket=bucket, Key=key)
        etag = head["ETag"].strip('"')
        if head["ContentLength"] != size or etag != md5:
            raise S3Error(
                f"s3://{bucket}/{key}: size/etag {head['ContentLength']}/{etag} != local {size}/{md5}"
            )


# ---------------------------------------------------------------- public
def upload_repository(local_dir: str | os.PathLike, url: str, client, *, overwrite: bool = False) -> list[str]:
    """Upload every file under `local_dir` to `url` (s3://bucket/prefix); returns the final keys.

    overwrite=False refuses a non-empty final prefix; overwrite=True replaces its content (the
    old objects are deleted first, so a failure leaves the prefix empty, never mixed).
    """
    local_dir = Path(local_dir)
    target = parse_s3_url(url)
    files = _local_files(local_dir)
    if not files:
        raise S3Error(f"{local_dir} holds no files to upload")
    expected = {}
    for rel, path in files.items():
        size = path.stat().st_size
        if size > MAX_OBJECT_BYTES:
            raise S3Error(f"{path} is {size} bytes, above the single-PUT limit this uploader verifies")
        expected[rel] = (size, *_md5(path))

    bucket = target.bucket
    staging = f"{STAGING_ROOT}/{uuid.uuid4().hex}"
    written_final = False
    try:
        existing = _list(client, bucket, target.prefix)
        if existing and not overwrite:
            raise S3Error(f"{target} is not empty ({len(existing)} objects) and overwrite is False")

        for rel, path in files.items():
            with open(path, "rb") as body:
                client.put_object(
                    Bucket=bucket, Key=f"{staging}/{rel}", Body=body, ContentMD5=expected[rel][2]
                )
        _verify(client, bucket, staging, {rel: v[:2] for rel, v in expected.items()})

        written_final = True
        if existing:
            _delete(client, bucket, existing)
        for rel in files:
            client.copy_object(
                Bucket=bucket,
                Key=f"{target.prefix}/{rel}",
                CopySource={"Bucket": bucket, "Key": f"{staging}/{rel}"},
            )
        _verify(client, bucket, target.prefix, {rel: v[:2] for rel, v in expected.items()})
        _delete(client, bucket, _list(client, bucket, staging))
    except Exception as e:
        _cleanup(client, bucket, staging, target.prefix if written_final else None)
        if isinstance(e, S3Error):
            raise
        raise S3Error(f"upload of {local_dir} to {target} failed ({type(e).__name__}: {e})") from e
    log.info("uploaded %d files to %s", len(files), target)
    return [f"{target.prefix}/{rel}" for rel in files]


def _cleanup(client, bucket: str, staging: str, final_prefix: str | None) -> None:
    # Best effort: the original error matters more than a second one while cleaning up.
    for prefix in (staging, final_prefix):
        if prefix is None:
            continue
        try:
            _delete(client, bucket, _list(client, bucket, prefix))
        except Exception as e:  # noqa: BLE001
            log.warning("cleanup of s3://%s/%s failed: %s", bucket, prefix, type(e).__name__)


def download_repository(url: str, local_dir: str | os.PathLike, client) -> list[Path]:
    """Download everything under `url` into `local_dir` (created whole, via a temp dir + rename)."""
    target = parse_s3_url(url)
    local_dir = Path(local_dir)
    if local_dir.exists():
        raise FileExistsError(f"{local_dir} exists; download_repository writes a fresh directory")
    objects = _list(client, target.bucket, target.prefix)
    if not objects:
        raise S3Error(f"{target} holds no objects")
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.", suffix=".tmp", dir=local_dir.parent))
    try:
        paths = []
        for key in sorted(objects):
            rel = PurePosixPath(key[len(target.prefix) + 1 :])
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                raise S3Error(f"refusing object key {key!r} that escapes the target directory")
            dst = tmp.joinpath(*rel.parts)
            dst.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(target.bucket, key, str(dst))
            if dst.stat().st_size != objects[key]["Size"]:
                raise S3Error(f"s3://{target.bucket}/{key}: downloaded size differs from the listing")
            paths.append(local_dir.joinpath(*rel.parts))
        os.chmod(tmp, 0o755)
        os.replace(tmp, local_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
