"""The DVC pipeline for real: `dvc repro` in a temporary git + DVC repo holding this project's
dvc.yaml, params.yaml (with the tiny overlay merged in) and src/; a second repro is a no-op;
changing one supernet param re-runs only train-supernet; push to and pull from an S3-protocol
server (moto, server mode, on 127.0.0.1).

Only `train-supernet` and what it depends on are reproduced, so stages appended later to
dvc.yaml do not slow these tests down.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY
from servers import moto_server, s3_env  # noqa: F401  (pytest fixtures)

from tailor.config import deep_merge

pytestmark = pytest.mark.slow

TARGET = "train-supernet"
UPSTREAM = ("prepare-data", "train-teacher", "train-supernet")
OUTS = ("data/prepared", "models/teacher.pt", "models/supernet.pt")


def env() -> dict:
    e = dict(os.environ)
    e.pop("TAILOR_STOP_AFTER_EPOCH", None)
    e["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")])
    e["DVC_NO_ANALYTICS"] = "1"
    e["GIT_AUTHOR_NAME"] = e["GIT_COMMITTER_NAME"] = "tailor-test"
    e["GIT_AUTHOR_EMAIL"] = e["GIT_COMMITTER_EMAIL"] = "tailor-test@localhost"
    return e


def trace_file(repo: Path) -> Path:
    return repo.parent / f"{repo.name}.modules.jsonl"  # outside the repo: dvc and git never see it


def run(repo: Path, *args, check=True, timeout=600) -> subprocess.CompletedProcess:
    e = {**env(), "TAILOR_TRACE_MODULES": str(trace_file(repo))}
    r = subprocess.run(list(map(str, args)), cwd=repo, env=e, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def dvc(repo: Path, *args, **kw) -> subprocess.CompletedProcess:
    return run(repo, sys.executable, "-m", "dvc", *args, **kw)


def ran(r: subprocess.CompletedProcess) -> list[str]:
    """Stages that `dvc repro` ran, from its output."""
    return re.findall(r"Running stage '([^']+)'", r.stdout + r.stderr)


def skipped(r: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Stage '([^']+)' didn't change, skipping", r.stdout + r.stderr)


def lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


def assert_deps_cover_the_code_that_ran(repo: Path, stages_ran: list[str]) -> None:
    """Every tailor source file a stage's command loaded is among that stage's dvc.yaml deps
    (a file, or a folder above it): otherwise editing it would not re-run the stage."""
    loaded: dict[str, set[str]] = {}
    for line in trace_file(repo).read_text().splitlines():
        rec = json.loads(line)
        loaded.setdefault(rec["command"], set()).update(rec["modules"])
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    missing, checked = {}, []
    for name in {s.split("@")[0] for s in stages_ran}:
        spec = stages[name].get("do", stages[name])
        files = loaded[spec["cmd"].split()[1]]
        deps = [d.rstrip("/") for d in spec["deps"]]
        checked.append(name)
        if gaps := sorted(f for f in files if not any(f == d or f.startswith(d + "/") for d in deps)):
            missing[name] = gaps
    assert checked and not missing, f"dvc.yaml deps lack the code these stages ran: {missing}"


def digest(path: Path) -> dict[str, str]:
    """Relative file -> sha256 for a file or every file under a directory."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def outputs_digest(repo: Path) -> dict[str, str]:
    out = {}
    for o in OUTS:
        out.update(digest(repo / o))
    return out


def set_param(repo: Path, section: str, key: str, value):
    f = repo / "params.yaml"
    raw = yaml.safe_load(f.read_text())
    raw[section][key] = value
    f.write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A temporary repo after its first `dvc repro train-supernet`, and that run's output."""
    repo = tmp_path_factory.mktemp("dvcrepo") / "repo"
    repo.mkdir()
    shutil.copy2(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (repo / "data" / "raw").mkdir(parents=True)  # prepare-data depends on the raw-data folder
    shutil.copy2(ROOT / "data" / "raw" / "README.md", repo / "data" / "raw" / "README.md")
    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), yaml.safe_load(TINY.read_text()))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    dvc(repo, "config", "core.autostage", "false")
    t0 = time.perf_counter()
    first = dvc(repo, "repro", TARGET)
    seconds = time.perf_counter() - t0
    return {"repo": repo, "first": first, "seconds": seconds}


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_first_repro_runs_the_upstream_stages(reproduced):
    repo, first = reproduced["repo"], reproduced["first"]
    assert ran(first) == list(UPSTREAM), first.stdout
    stages = lock(repo)
    for s in UPSTREAM:
        assert s in stages
    # Each stage records only its own params keys: changing a supernet param cannot touch the others.
    assert "supernet" not in stages["prepare-data"]["params"]["params.yaml"]
    assert "supernet" not in stages["train-teacher"]["params"]["params.yaml"]
    assert "kd_weight" in stages["train-supernet"]["params"]["params.yaml"]["supernet"]
    for o in OUTS:
        assert (repo / o).exists(), o
    for m in ("data", "teacher", "supernet"):
        assert (repo / "metrics" / f"{m}.json").exists()
    assert_deps_cover_the_code_that_ran(repo, ran(first))
    r = dvc(repo, "metrics", "show", "--json")
    assert "metrics/supernet.json" in r.stdout


def test_second_repro_is_a_no_op(reproduced, tmp_path):
    repo = copy_repo(reproduced["repo"], tmp_path / "repo")
    before_lock = (repo / "dvc.lock").read_bytes()
    before = outputs_digest(repo)
    st = dvc(repo, "status", TARGET, "--with-deps")
    assert "up to date" in st.stdout, st.stdout
    t0 = time.perf_counter()
    r = dvc(repo, "repro", TARGET)
    seconds = time.perf_counter() - t0
    assert ran(r) == [], r.stdout
    assert sorted(skipped(r)) == sorted(UPSTREAM), r.stdout
    assert (repo / "dvc.lock").read_bytes() == before_lock
    assert outputs_digest(repo) == before
    assert "up to date" in dvc(repo, "status", TARGET, "--with-deps").stdout
    print(f"first repro {reproduced['seconds']:.1f}s, no-op repro {seconds:.1f}s")


def test_changing_a_supernet_param_reruns_only_train_supernet(reproduced, tmp_path):
    repo = copy_repo(reproduced["repo"], tmp_path / "repo")
    before = lock(repo)
    old = outputs_digest(repo)
    kd = yaml.safe_load((repo / "params.yaml").read_text())["supernet"]["kd_weight"]
    set_param(repo, "supernet", "kd_weight", kd / 2)
    st = dvc(repo, "status", TARGET, "--with-deps")
    assert "train-supernet" in st.stdout and "prepare-data" not in st.stdout and "train-teacher" not in st.stdout, \
        st.stdout
    r = dvc(repo, "repro", TARGET)
    assert ran(r) == ["train-supernet"], r.stdout
    after = lock(repo)
    assert after["prepare-data"] == before["prepare-data"]
    assert after["train-teacher"] == before["train-teacher"]
    assert after["train-supernet"] != before["train-supernet"]
    assert after["train-supernet"]["params"]["params.yaml"]["supernet"]["kd_weight"] == kd / 2
    new = outputs_digest(repo)
    sup = [k for k in new if k.startswith("supernet.pt")]
    assert sup and all(new[k] != old[k] for k in sup)  # a real retrain, not a cache hit
    assert {k: v for k, v in new.items() if k not in sup} == {k: v for k, v in old.items() if k not in sup}
    # Whereas a data param invalidates prepare-data (and so, through its output, the rest).
    set_param(repo, "data", "val_fraction", 0.25)
    st = dvc(repo, "status", TARGET, "--with-deps")
    assert "prepare-data" in st.stdout, st.stdout


def test_push_to_s3_and_pull_back(reproduced, s3_env, tmp_path):  # noqa: F811
    import boto3

    repo = copy_repo(reproduced["repo"], tmp_path / "repo")
    bucket = f"tailor-dvc-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=s3_env.endpoint_url)
    s3.create_bucket(Bucket=bucket)
    dvc(repo, "remote", "add", "-d", "store", f"s3://{bucket}/cache")
    dvc(repo, "remote", "modify", "store", "endpointurl", s3_env.endpoint_url)
    before = outputs_digest(repo)
    r = dvc(repo, "push", TARGET, "--with-deps")
    objects = s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0)
    n_files = len(before)
    assert objects >= n_files, (objects, n_files, r.stdout)

    shutil.rmtree(repo / ".dvc" / "cache")
    for o in OUTS:
        p = repo / o
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    st = dvc(repo, "status", TARGET, "--with-deps")
    assert "deleted" in st.stdout, st.stdout

    dvc(repo, "pull", TARGET, "--with-deps")
    assert outputs_digest(repo) == before
    assert "up to date" in dvc(repo, "status", TARGET, "--with-deps").stdout
    r = dvc(repo, "repro", TARGET)
    assert ran(r) == [], r.stdout


def test_dvc_plots_show_renders_the_reports_plot_data(tiny_run, tmp_path):
    """dvc.yaml's plots: section against the files the report stage writes (training curves, Pareto
    points, the PNGs): `dvc plots show` renders them, as on a fresh clone after `./dev repro`."""
    from tailor import stages

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy2(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy2(ROOT / "params.yaml", repo / "params.yaml")  # dvc.yaml's foreach reads it
    run(repo, "git", "init", "-q")
    dvc(repo, "init", "-q")
    stages.report(tiny_run["params"], tiny_run["root"] / "metrics", tmp_path / "none.md", repo / "reports" / "report.md",
                  tmp_path / "summary.json")
    r = dvc(repo, "plots", "show", "--json")
    import json as _json

    out = _json.loads(r.stdout)
    # Without a latency table (none in this run) there is no latency picture or LUT scatter: the only errors allowed.
    assert all(e.get("name") in ("reports/plots/pareto-latency.png", "reports/plots/lut")
               for e in out.get("errors", [])), out["errors"]
    shown = out["data"]
    assert "reports/plots/pareto-madds.png" in shown, sorted(shown)
    assert any(k.startswith("Test top-1 vs MAdds") for k in shown)
    curves = [k for k in shown if k.startswith("reports/plots/training/")]  # one per network
    assert {"reports/plots/training/teacher.json", "reports/plots/training/supernet.json"} <= set(curves), sorted(shown)
    r = dvc(repo, "plots", "show", "-o", tmp_path / "html")
    assert (tmp_path / "html" / "index.html").is_file()


@pytest.mark.slow
def test_fraction_budgets_run_through_retrain_and_export(reproduced, tmp_path):
    """search.budgets as fractions, retrain.scenarios spelt the same way: dvc.yaml's foreach paths
    (retrain/sc0__0.3/) are the ones export looks for."""
    repo = copy_repo(reproduced["repo"], tmp_path / "repo")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["search"]["budgets"] = {"kind": "fraction", "values": [0.3, 0.7]}
    raw["retrain"]["scenarios"] = [{"superclass": "sc0", "budget": 0.3, "arch": None}]
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    r = dvc(repo, "repro", "export", timeout=1200)
    assert "retrain@0" in ran(r) and "export" in ran(r)
    assert_deps_cover_the_code_that_ran(repo, ran(r))
    assert (repo / "retrain" / "sc0__0.3" / "model.pt").is_file()
    m = json.loads((repo / "metrics" / "export.json").read_text())
    assert m["passed"] and len(m["models"]) == 1
    res = json.loads((repo / "search" / "results.json").read_text())
    lo, hi = res["cost"]["low"], res["cost"]["high"]
    arch = json.loads((repo / "metrics" / "retrain" / "sc0__0.3.json").read_text())["arch"]
    first = res["seeds"][0]
    pick = [row for row in res["methods"]["generator"]["rows"] if row["seed"] == first and row["superclass"] == "sc0"
            and abs(row["budget"] - (lo + 0.3 * (hi - lo))) < 1e-6 * hi]
    assert [row["arch"] for row in pick] == [arch]  # the search's pick at the resolved budget


def test_a_fresh_clone_shows_the_committed_metrics_and_plots(tmp_path):
    """As in DVC's example-get-started: the last `./dev repro`'s metrics and plot data are committed,
    so `dvc metrics show` and `dvc plots show` work on a clone before anything runs, and
    `dvc metrics diff` can compare commits."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", ROOT, clone)
    tracked = run(clone, "git", "ls-files", "metrics").stdout.split()
    declared = [next(iter(m)) for s in yaml.safe_load((clone / "dvc.yaml").read_text())["stages"].values()
                for m in s.get("metrics", []) if "${" not in next(iter(m))]
    assert declared and set(declared) <= set(tracked), f"metrics not committed: {set(declared) - set(tracked)}"
    shown = json.loads(dvc(clone, "metrics", "show", "--json").stdout)[""]
    files = shown.get("data", {})
    assert "error" not in shown and set(declared) <= set(files), sorted(files)
    assert all("error" not in f and f.get("data") for f in files.values()), {k: f.keys() for k, f in files.items()}
    report = json.loads((clone / "metrics" / "report.json").read_text())
    # What the last repro wrote, read back by dvc (which drops non-numeric leaves).
    assert files["metrics/report.json"]["data"]["headline"]["stock_madds"]["diff"] == report["headline"]["stock_madds"]["diff"]
    plots = json.loads(dvc(clone, "plots", "show", "--json").stdout)
    assert not plots.get("errors"), plots["errors"]
    shown = set(plots["data"])
    assert any(k.startswith("reports/plots/lut/") for k in shown), sorted(shown)  # the LUT scatter
    assert any(k.startswith("reports/plots/training/") for k in shown) and "reports/plots/pareto-madds.png" in shown
    out = tmp_path / "html"
    dvc(clone, "plots", "show", "-o", out)
    assert (out / "index.html").is_file()
