"""Training: superclass dropout mask and masked losses, evaluation metrics, the fit loop's
checkpoint/resume (in process, through the CLI with a stop after an epoch, and a real SIGKILL),
and what the training stages record."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import ROOT, TINY, tiny_params

from tailor import stages
from tailor.data import Batches, Meta
from tailor.train import (evaluate, fit, make_optimizer, masked_cross_entropy, masked_kd, superclass_keep_mask,
                          warmup_cosine)

CLASS_SC = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # 4 superclasses of unequal size


def mask(sc, q, seed=0, class_sc=CLASS_SC):
    return superclass_keep_mask(torch.as_tensor(sc), class_sc, q, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- superclass dropout
def test_mask_keeps_own_superclass_always():
    sc = torch.randint(0, 4, (2000,), generator=torch.Generator().manual_seed(1))
    for q in (0.0, 0.3, 0.9, 1.0):
        keep = mask(sc, q)
        assert keep.shape == (2000, 10) and keep.dtype == torch.bool
        own = CLASS_SC[None, :] == sc[:, None]
        assert keep[own].all(), q


def test_mask_q0_keeps_all_and_q1_keeps_only_own():
    sc = torch.randint(0, 4, (500,), generator=torch.Generator().manual_seed(2))
    assert mask(sc, 0.0).all()
    own = CLASS_SC[None, :] == sc[:, None]
    assert torch.equal(mask(sc, 1.0), own)


def test_mask_drops_whole_groups_together():
    sc = torch.randint(0, 4, (1000,), generator=torch.Generator().manual_seed(3))
    keep = mask(sc, 0.5)
    for g in range(4):
        cols = keep[:, CLASS_SC == g]
        assert (cols.all(1) | ~cols.any(1)).all(), f"superclass {g} split"


def test_mask_drop_rate_matches_q():
    n = 20000
    sc = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(4))
    for q in (0.2, 0.5, 0.8):
        keep = mask(sc, q, seed=5)
        for g in range(4):
            other = sc != g
            dropped = (~keep[other][:, CLASS_SC == g].any(1)).float().mean().item()
            assert abs(dropped - q) < 0.02, (q, g, dropped)  # sd ~ 0.004 at n/4 * 3 samples


def test_mask_is_seeded_and_varies_across_samples():
    sc = torch.zeros(64, dtype=torch.long)
    assert torch.equal(mask(sc, 0.5, seed=7), mask(sc, 0.5, seed=7))
    assert not torch.equal(mask(sc, 0.5, seed=7), mask(sc, 0.5, seed=8))
    assert len({tuple(r.tolist()) for r in mask(sc, 0.5, seed=7)}) > 4


def test_mask_follows_the_device_of_the_labels():
    sc = torch.tensor([0, 3])
    assert mask(sc, 0.5).device == sc.device


# ---------------------------------------------------------------- masked losses
def random_case(seed=0, n=64, q=0.6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=g) * 3
    y = torch.randint(0, 10, (n,), generator=g)
    keep = mask(CLASS_SC[y], q, seed)
    return logits, y, keep


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_cross_entropy_is_plain_ce_over_kept_logits(smoothing):
    logits, y, keep = random_case()
    assert not keep.all()
    per = []
    for i in range(len(y)):
        cols = keep[i].nonzero().squeeze(1)
        target = (cols == y[i]).nonzero().item()
        per.append(F.cross_entropy(logits[i, cols][None], torch.tensor([target]), label_smoothing=smoothing))
    want = torch.stack(per).mean()
    got = masked_cross_entropy(logits, y, keep, smoothing)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # With nothing dropped it is torch's cross-entropy.
    full = torch.ones_like(keep)
    torch.testing.assert_close(masked_cross_entropy(logits, y, full, smoothing),
                               F.cross_entropy(logits, y, label_smoothing=smoothing), rtol=1e-5, atol=1e-6)


def test_masked_cross_entropy_ignores_dropped_logits_and_their_gradients():
    logits, y, keep = random_case(1)
    other = logits.clone()
    other[~keep] = torch.randn(int((~keep).sum())) * 100
    assert masked_cross_entropy(logits, y, keep) == masked_cross_entropy(other, y, keep)
    lg = logits.clone().requires_grad_(True)
    masked_cross_entropy(lg, y, keep, 0.1).backward()
    assert (lg.grad[~keep] == 0).all() and lg.grad[keep].abs().sum() > 0


def test_masked_kd():
    logits, y, keep = random_case(2)
    assert float(masked_kd(logits, logits.clone(), keep, 1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(masked_kd(logits, logits.clone(), keep, 4.0)) == pytest.approx(0.0, abs=1e-6)
    g = torch.Generator().manual_seed(9)
    teacher = logits + torch.randn(logits.shape, generator=g)
    base = masked_kd(logits, teacher, keep, 2.0)
    assert float(base) > 0
    # Dropped logits of either network do not matter.
    s2, t2 = logits.clone(), teacher.clone()
    s2[~keep] = 50.0
    t2[~keep] = -50.0
    torch.testing.assert_close(masked_kd(s2, t2, keep, 2.0), base)
    # It is T^2 * KL(teacher || student) of the softmaxes over the kept logits, per sample, averaged.
    want = []
    for i in range(len(y)):
        cols = keep[i]
        pt = F.log_softmax(teacher[i, cols] / 2.0, 0)
        ps = F.log_softmax(logits[i, cols] / 2.0, 0)
        want.append((pt.exp() * (pt - ps)).sum() * 4.0)
    torch.testing.assert_close(base, torch.stack(want).mean(), rtol=1e-5, atol=1e-6)


def test_warmup_cosine_schedule():
    at = warmup_cosine(1.0, 10, 2)
    assert at(0) < 0.01 and at(1) == pytest.approx(0.5, abs=1e-3)
    assert at(2) == pytest.approx(1.0)
    assert at(6) == pytest.approx(0.5)
    assert at(10) == pytest.approx(0.0, abs=1e-12)
    xs = [at(t / 10) for t in range(20, 101)]
    assert all(a >= b for a, b in zip(xs, xs[1:]))


# ---------------------------------------------------------------- evaluation
def index_batches(n=60, batch_size=16):
    """Images whose first pixel encodes their index, so a fake model can look up fixed logits."""
    meta = Meta(classes=[f"c{i}" for i in range(10)], superclasses=["a", "b", "c", "d"],
                class_superclass=CLASS_SC.tolist(), image_size=4, mean=[0.0] * 3, std=[1 / 255] * 3, source="t")
    x = np.zeros((n, 4, 4, 3), np.uint8)
    x[:, 0, 0, 0] = np.arange(n)
    y = np.random.default_rng(0).integers(0, 10, n).astype(np.int64)
    return meta, y, Batches(x, y, meta, torch.device("cpu"), batch_size)


def test_evaluate_superclass_restricted_top1():
    meta, y, b = index_batches()
    table = torch.randn(len(y), 10, generator=torch.Generator().manual_seed(0)) * 2
    table[np.arange(20), y[:20]] += 10  # a third right outright

    def model(x):
        return table[x[:, 0, 0, 0].round().long()]

    out = evaluate(model, b, meta)
    yt = torch.from_numpy(y)
    sc = CLASS_SC[yt]
    assert out["images"] == len(y)
    assert out["top1"] == pytest.approx(float((table.argmax(1) == yt).float().mean()), abs=1e-5)
    restricted = table.masked_fill(CLASS_SC[None, :] != sc[:, None], float("-inf")).argmax(1)
    per = {}
    for g, name in enumerate(meta.superclasses):
        sel = sc == g
        if sel.any():
            per[name] = float((restricted[sel] == yt[sel]).float().mean())
    assert out["sc_top1"] == pytest.approx(per, abs=1e-5)
    assert out["sc_top1_mean"] == pytest.approx(sum(per.values()) / len(per), abs=1e-5)
    assert out["sc_top1_mean"] > out["top1"]  # restriction can only help here
    assert out["images_per_s"] > 0

    # A specialised model for superclass 'c' (classes 5..8): only its samples, local labels.
    classes = meta.classes_of(2)

    def special(x):
        return table[x[:, 0, 0, 0].round().long()][:, classes]

    o2 = evaluate(special, b, meta, classes)
    sel = sc == 2
    assert o2["images"] == int(sel.sum()) and "top1" not in o2 and list(o2["sc_top1"]) == ["c"]
    assert o2["sc_top1"]["c"] == pytest.approx(per["c"], abs=1e-5)


# ---------------------------------------------------------------- fit: checkpoint and resume in process
def linear_setup(n=48):
    meta, y, b = index_batches(n, batch_size=8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(48, 10))
    opt = make_optimizer(model, tiny_params().teacher.optim)

    def step(m, x, y, sc, epoch, i):
        loss = F.cross_entropy(m(x / 50), y)
        loss.backward()
        return {"loss": loss.item()}

    return model, opt, b, step


def test_fit_resumes_exactly_and_ignores_foreign_checkpoints(tmp_path, monkeypatch):
    sched = warmup_cosine(0.1, 4, 0.5)
    ref_model, opt, b, step = linear_setup()
    ref = fit(ref_model, b, opt, 4, sched, step, tmp_path / "ref.pt", seed=1, fingerprint="A", log_every=0)
    assert len(ref.history) == 4 and ref.resumed_from_epoch == 0

    model, opt, b, step = linear_setup()
    monkeypatch.setenv("TAILOR_STOP_AFTER_EPOCH", "2")
    with pytest.raises(KeyboardInterrupt):
        fit(model, b, opt, 4, sched, step, tmp_path / "ck.pt", seed=1, fingerprint="A", log_every=0)
    monkeypatch.delenv("TAILOR_STOP_AFTER_EPOCH")
    assert torch.load(tmp_path / "ck.pt", weights_only=False)["epoch"] == 2
    model, opt, b, step = linear_setup()  # a fresh process: new model and optimizer
    res = fit(model, b, opt, 4, sched, step, tmp_path / "ck.pt", seed=1, fingerprint="A", log_every=0)
    assert res.resumed_from_epoch == 2 and len(res.history) == 4
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]

    # Another configuration's checkpoint is not resumed.
    model, opt, b, step = linear_setup()
    res = fit(model, b, opt, 4, sched, step, tmp_path / "ck.pt", seed=1, fingerprint="B", log_every=0)
    assert res.resumed_from_epoch == 0
    for k, v in ref_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # A different seed trains differently.
    model, opt, b, step = linear_setup()
    fit(model, b, opt, 4, sched, step, tmp_path / "s2.pt", seed=2, fingerprint="A", log_every=0)
    assert not torch.equal(model[2].weight, ref_model[2].weight)
    # No temporary files are left beside the checkpoints.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "ref.pt", "s2.pt"]


# ---------------------------------------------------------------- resume through the CLI, in subprocesses
def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("TAILOR_STOP_AFTER_EPOCH", None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


def tailor_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "tailor.cli", *map(str, args)]


def overlay(tmp_path: Path, name: str, content: dict) -> Path:
    f = tmp_path / name
    f.write_text(yaml.safe_dump(content))
    return f


def state_of(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_weights(a: Path, b: Path):
    sa, sb = state_of(a)["state_dict"], state_of(b)["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def strip_timing(history):
    return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]


@pytest.fixture(scope="module")
def teacher3(tiny_run, tmp_path_factory):
    """An uninterrupted 3-epoch tiny teacher, trained in process: the reference for resumed runs."""
    tmp = tmp_path_factory.mktemp("teacher3")
    p = tiny_params(teacher={"epochs": 3})
    stages.train_teacher(p, tiny_run["data"], tmp / "teacher.pt", tmp / "teacher.json", tmp / "work")
    return {"out": tmp / "teacher.pt", "metrics": tmp / "teacher.json",
            "overlay": overlay(tmp, "epochs3.yaml", {"teacher": {"epochs": 3}})}


@pytest.mark.slow
def test_cli_teacher_resumes_after_a_stop_and_equals_an_uninterrupted_run(tiny_run, teacher3, tmp_path):
    args = tailor_cmd("train-teacher", "--params", ROOT / "params.yaml", "--preset", TINY, "--preset",
                      teacher3["overlay"], "--data", tiny_run["data"], "--out", tmp_path / "t.pt",
                      "--metrics", tmp_path / "t.json", "--work-dir", tmp_path / "work")
    r = subprocess.run(args, env=cli_env(TAILOR_STOP_AFTER_EPOCH="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 130, r.stderr
    assert "interrupted" in r.stderr
    assert state_of(tmp_path / "work" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "t.pt").exists() and not (tmp_path / "t.json").exists()

    r = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "at epoch 1/3" in r.stderr and "resuming from" in r.stderr
    assert_same_weights(tmp_path / "t.pt", teacher3["out"])
    got, want = json.loads((tmp_path / "t.json").read_text()), json.loads(teacher3["metrics"].read_text())
    assert strip_timing(got["history"]) == strip_timing(want["history"])
    assert got["subnets"]["max"]["val_sc_top1_mean"] == want["subnets"]["max"]["val_sc_top1_mean"]


@pytest.mark.slow
def test_cli_teacher_resumes_after_sigkill(tiny_run, teacher3, tmp_path):
    args = tailor_cmd("train-teacher", "--params", ROOT / "params.yaml", "--preset", TINY, "--preset",
                      teacher3["overlay"], "--data", tiny_run["data"], "--out", tmp_path / "t.pt",
                      "--metrics", tmp_path / "t.json", "--work-dir", tmp_path / "work")
    ck = tmp_path / "work" / "checkpoint.pt"
    # Kill as soon as the first checkpoint lands; two more epochs remain, so the kill falls
    # mid-training (or mid-save). On a badly stalled machine the run may finish first: try again.
    for attempt in range(3):
        shutil.rmtree(tmp_path / "work", ignore_errors=True)
        proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 240
            while not ck.exists():
                assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stderr.read()}"
                assert time.monotonic() < deadline, "no checkpoint after 240 s"
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stderr.close()
        if not (tmp_path / "t.pt").exists():
            break
        (tmp_path / "t.pt").unlink()
    else:
        pytest.fail("the run finished before the kill three times; the test did not exercise a kill")
    assert proc.returncode == -signal.SIGKILL
    epoch = state_of(ck)["epoch"]  # the checkpoint on disk is whole, whatever the kill interrupted
    # Usually epoch 1 or 2; 3 when a stalled poller let the kill land in the final evaluation.
    assert 1 <= epoch <= 3

    r = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"at epoch {epoch}/3" in r.stderr
    assert_same_weights(tmp_path / "t.pt", teacher3["out"])
    assert not [p for p in (tmp_path / "work").iterdir() if p.name != "checkpoint.pt" and p.suffix != ".tmp"]


@pytest.mark.slow
def test_cli_supernet_resumes_after_a_stop(tiny_run, tmp_path):
    args = tailor_cmd("train-supernet", "--params", ROOT / "params.yaml", "--preset", TINY, "--data", tiny_run["data"],
                      "--teacher", tiny_run["teacher"], "--out", tmp_path / "s.pt", "--metrics", tmp_path / "s.json",
                      "--work-dir", tmp_path / "work")
    r = subprocess.run(args, env=cli_env(TAILOR_STOP_AFTER_EPOCH="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 130, r.stderr
    r = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    # The session fixture trained the same supernet uninterrupted, in process.
    assert_same_weights(tmp_path / "s.pt", tiny_run["supernet"])


# ---------------------------------------------------------------- what the stages record
def test_supernet_metrics_have_min_mid_max_with_ascending_madds(tiny_run):
    m = json.loads((tiny_run["root"] / "metrics" / "supernet.json").read_text())
    p = tiny_run["params"]
    subnets = m["subnets"]
    assert list(subnets) == ["min", "mid", "max"]
    madds = [subnets[k]["madds_m"] for k in ("min", "mid", "max")]
    assert madds[0] < madds[1] < madds[2]
    n_sc = p.data.synthetic.superclasses
    for name, s in subnets.items():
        assert len(s["test_sc_top1"]) == n_sc
        assert s["test_sc_top1_mean"] == pytest.approx(sum(s["test_sc_top1"].values()) / n_sc, abs=1e-4)
        for k in ("val_sc_top1_mean", "test_sc_top1_mean", "val_top1", "test_top1"):
            assert 0.0 <= s[k] <= 1.0, (name, k)
        assert s["test_images_per_s"] > 0
    assert m["epochs"] == sum(ph.epochs for ph in p.supernet.phases) == len(m["history"])
    assert m["phases"] == [ph.name for ph in p.supernet.phases]
    assert m["superclass_dropout"] == p.supernet.superclass_dropout
    assert m["train_seconds"] > 0 and all("ce" in h and "kd" in h and h["images_per_s"] > 0 for h in m["history"])


def test_teacher_metrics_and_artifacts_record_provenance(tiny_run):
    m = json.loads((tiny_run["root"] / "metrics" / "teacher.json").read_text())
    p = tiny_run["params"]
    assert "max" in m["subnets"] and m["epochs"] == p.teacher.epochs
    for path, stage in ((tiny_run["teacher"], "train-teacher"), (tiny_run["supernet"], "train-supernet")):
        ck = state_of(path)
        assert ck["stage"] == stage and ck["code_version"]
        assert ck["params"] == p.model_dump(mode="json")
        assert ck["metrics"]["subnets"]["max"]["arch"] == str(stages.SearchSpace(p.space, p.data.image_size).max_arch)


def test_load_supernet_rebuilds_the_trained_network(tiny_run):
    net, ck = stages.load_supernet(tiny_run["supernet"])
    sd = ck["state_dict"]
    for k, v in net.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert net.num_classes == ck["num_classes"] and net.space.image_size == ck["image_size"]


def test_inplace_distillation_uses_the_steps_largest_subnet_not_the_teacher(tiny_run, tmp_path, monkeypatch):
    """supernet.kd_source inplace (with teacher.epochs 0): the teacher network never runs; every
    subnet after the first of a step distils from the first (the largest) subnet's detached logits."""
    from tailor import stages, supernet_training
    from tailor.supernet import SuperNet

    p = tiny_params(teacher={"epochs": 0}, supernet={"kd_source": "inplace", "sampler": "sandwich",
                                                     "subnets_per_step": 3})
    stages.train_teacher(p, tiny_run["data"], tmp_path / "t.pt", tmp_path / "t.json", tmp_path / "wt")
    calls, forwards = [], []
    real_kd, real_forward = supernet_training.masked_kd, SuperNet.forward

    def kd(student, teacher, keep, temperature):
        calls.append(teacher)
        return real_kd(student, teacher, keep, temperature)

    def forward(self, x, arch=None):
        out = real_forward(self, x, arch)
        forwards.append((self.training, arch, out))
        return out

    monkeypatch.setattr(supernet_training, "masked_kd", kd)
    monkeypatch.setattr(SuperNet, "forward", forward)
    m = stages.train_supernet(p, tiny_run["data"], tmp_path / "t.pt", tmp_path / "s.pt", tmp_path / "s.json",
                              tmp_path / "ws")
    train = [f for f in forwards if f[0]]
    steps = len(train) // 3
    assert steps > 0 and len(train) == 3 * steps, "only the student subnets ran in training (no teacher forward)"
    assert len(calls) == 2 * steps
    for s in range(steps):
        largest = train[3 * s]
        assert largest[1] == stages.SearchSpace(p.space, 16).max_arch
        for t in calls[2 * s:2 * s + 2]:
            assert not t.requires_grad and torch.equal(t, largest[2].detach())
    assert all(h["kd"] > 0 for h in m["history"])
