"""Raw data under DVC, for real, in temporary git + DVC repos holding this project's dvc.yaml,
.gitignore, .dvcignore, data/raw/README.md, src/ and params.yaml (tiny overlay merged): with the
default synthetic data prepare-data does not depend on any dataset; an ImageFolder zip tracked by
`dvc add` (or imported from S3 by `dvc import-url`) under data/raw/ re-runs prepare-data when a new
version lands, never lands in git, and goes to the S3 remote configured as README's template says,
from where a fresh clone pulls it back."""
from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY
from servers import moto_server, s3_env  # noqa: F401  (pytest fixtures)
from test_data import make_tree, zip_tree
from test_dvc import copy_repo, dvc, ran, run

from tailor.config import deep_merge

pytestmark = pytest.mark.slow

STAGE = "prepare-data"
ZIP = "data/raw/tiny.zip"


def set_data(repo: Path, path: str):
    """Point params.yaml at the ImageFolder dataset `path` (superclasses felines and fish)."""
    f = repo / "params.yaml"
    raw = yaml.safe_load(f.read_text())
    raw["data"].update(source="imagefolder", path=path)
    raw["search"]["superclasses"] = None
    raw["retrain"]["scenarios"] = [{**raw["retrain"]["scenarios"][0], "superclass": "fish"}]
    f.write_text(yaml.safe_dump(raw, sort_keys=False))


def dataset_zip(tmp: Path, n_train: int) -> Path:
    """A small ImageFolder zip: 4 classes x (n_train train + 3 test) images."""
    tree = tmp / f"tree{n_train}"
    shutil.rmtree(tree, ignore_errors=True)
    return zip_tree(make_tree(tree, n_train=n_train, n_test=3), tmp / f"tiny{n_train}.zip")


def data_metrics(repo: Path) -> dict:
    return json.loads((repo / "metrics" / "data.json").read_text())


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def git_files(repo: Path) -> set[str]:
    return set(run(repo, "git", "ls-files").stdout.split())


def commit(repo: Path, message: str):
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A repo after `dvc repro prepare-data` on the default synthetic data, committed."""
    repo = tmp_path_factory.mktemp("rawrepo") / "repo"
    repo.mkdir()
    run(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.autostage", "false")
    for f in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy2(ROOT / f, repo / f)
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "data" / "raw").mkdir(parents=True)
    shutil.copy2(ROOT / "data" / "raw" / "README.md", repo / "data" / "raw" / "README.md")
    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(TINY.read_text()))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = dvc(repo, "repro", STAGE)
    assert ran(r) == [STAGE], r.stdout
    commit(repo, "synthetic")
    return repo


def test_synthetic_data_depends_on_no_dataset(synthetic, tmp_path):
    repo = copy_repo(synthetic, tmp_path / "repo")
    assert data_metrics(repo)["source"] == "synthetic"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][STAGE]
    [raw] = [d for d in lock["deps"] if d["path"] == "data/raw"]
    assert raw["nfiles"] == 0  # the README is no data to DVC
    # Only the README is in git under data/raw; editing it re-runs nothing.
    assert [f for f in git_files(repo) if f.startswith("data/")] == ["data/raw/README.md"]
    (repo / "data" / "raw" / "README.md").write_text("edited\n")
    assert ran(dvc(repo, "repro", STAGE)) == []
    # A fresh clone has the folder (for its README): prepare-data runs there with no `dvc pull` and
    # no remote, its data/raw dependency unchanged.
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", repo, clone)
    assert "data/raw" not in dvc(clone, "status", STAGE).stdout
    assert ran(dvc(clone, "repro", STAGE)) == [STAGE]
    assert data_metrics(clone) == {**data_metrics(repo), "seconds": data_metrics(clone)["seconds"]}


def test_an_added_dataset_reruns_prepare_data_and_goes_to_the_s3_remote(synthetic, tmp_path, s3_env,
                                                                          monkeypatch):
    import boto3

    repo = copy_repo(synthetic, tmp_path / "repo")
    # README's remote template: the remote and endpoint committed, the credentials a profile named
    # in .dvc/config.local. With no key pair in the environment, only that profile can sign.
    bucket = f"tailor-raw-{uuid.uuid4().hex[:8]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    creds = tmp_path / "aws-credentials"
    creds.write_text(f"[tailor]\naws_access_key_id = {s3_env.env['AWS_ACCESS_KEY_ID']}\n"
                     f"aws_secret_access_key = {s3_env.env['AWS_SECRET_ACCESS_KEY']}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    dvc(repo, "remote", "add", "-d", "storage", f"s3://{bucket}/tailor")
    dvc(repo, "remote", "modify", "storage", "endpointurl", s3_env.endpoint_url)
    dvc(repo, "remote", "modify", "--local", "storage", "profile", "tailor")
    assert "profile" not in (repo / ".dvc" / "config").read_text()
    assert "config.local" not in run(repo, "git", "status", "--porcelain").stdout  # DVC keeps it out of git
    commit(repo, "DVC remote")

    versions = []
    for n_train in (5, 7):
        shutil.copy2(dataset_zip(tmp_path, n_train), repo / ZIP)
        if versions:  # a new version of the dataset: prepare-data sees it before DVC records it
            assert "data/raw" in dvc(repo, "status", STAGE).stdout
        dvc(repo, "add", ZIP)
        set_data(repo, ZIP)
        r = dvc(repo, "repro", STAGE)
        assert ran(r) == [STAGE], r.stdout
        m = data_metrics(repo)
        assert (m["source"], m["classes"], m["train_images"] + m["val_images"]) == ("imagefolder", 4, 4 * n_train)
        assert ran(dvc(repo, "repro", STAGE)) == []
        commit(repo, f"tiny, {n_train} training images a class")
        tracked = git_files(repo)
        assert f"{ZIP}.dvc" in tracked and ZIP not in tracked  # DVC's, not git's
        dvc(repo, "push")
        versions.append(md5(repo / ZIP))
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket)["Contents"]}
    assert {f"tailor/files/md5/{v[:2]}/{v[2:]}" for v in versions} <= keys

    # A fresh clone (no cache, no config.local) pulls the last version back, and the one before.
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", repo, clone)
    dvc(clone, "remote", "modify", "--local", "storage", "profile", "tailor")
    dvc(clone, "pull", STAGE, "--with-deps")  # its outputs and the dataset it depends on
    assert md5(clone / ZIP) == versions[-1]
    assert ran(dvc(clone, "repro", STAGE)) == []
    run(clone, "git", "checkout", "-q", "HEAD~1")
    dvc(clone, "pull", f"{ZIP}.dvc")
    assert md5(clone / ZIP) == versions[0]


def test_an_imported_dataset_is_updated_from_s3(synthetic, tmp_path, s3_env):
    import boto3

    s3 = boto3.client("s3")
    bucket = f"tailor-datasets-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(dataset_zip(tmp_path, 5)), bucket, "datasets/tiny.zip")
    repo = copy_repo(synthetic, tmp_path / "repo")
    dvc(repo, "import-url", f"s3://{bucket}/datasets/tiny.zip", ZIP)  # endpoint: AWS_ENDPOINT_URL
    set_data(repo, ZIP)
    assert ran(dvc(repo, "repro", STAGE)) == [STAGE]
    assert data_metrics(repo)["train_images"] + data_metrics(repo)["val_images"] == 4 * 5
    assert ran(dvc(repo, "repro", STAGE)) == []
    # A new object at the same key: `dvc update` fetches it (its ETag changed), repro re-runs prepare-data.
    s3.upload_file(str(dataset_zip(tmp_path, 7)), bucket, "datasets/tiny.zip")
    dvc(repo, "update", f"{ZIP}.dvc")
    r = dvc(repo, "repro", STAGE)
    assert ran(r) == [STAGE], r.stdout
    assert data_metrics(repo)["train_images"] + data_metrics(repo)["val_images"] == 4 * 7
    commit(repo, "tiny imported")
    assert f"{ZIP}.dvc" in git_files(repo) and ZIP not in git_files(repo)
