"""prepare-data sources (synthetic, imagefolder dir/zip, cifar100), superclass maps, splits, Batches."""
from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TIN_SC10, tiny_params
from PIL import Image
from servers import moto_server, s3_env  # noqa: F401  (pytest fixtures)

from tailor import data as datamod
from tailor import stages
from tailor.data import Batches, DataError, Meta, build, check_superclass_map, stratified_split


# ---------------------------------------------------------------- synthetic
def test_synthetic_is_deterministic_by_seed():
    cfg = tiny_params().data
    a = datamod.make_synthetic(cfg.synthetic, cfg.image_size, seed=3)
    b = datamod.make_synthetic(cfg.synthetic, cfg.image_size, seed=3)
    c = datamod.make_synthetic(cfg.synthetic, cfg.image_size, seed=4)
    assert a[0] == b[0]
    for split in (1, 2):
        assert np.array_equal(a[split][0], b[split][0]) and np.array_equal(a[split][1], b[split][1])
        assert not np.array_equal(a[split][0], c[split][0])
    ma, sa = build(cfg, seed=3)
    mb, sb = build(cfg, seed=3)
    assert ma == mb
    for k in sa:
        assert np.array_equal(sa[k][0], sb[k][0]) and np.array_equal(sa[k][1], sb[k][1])


def test_synthetic_shapes_and_classes():
    p = tiny_params()
    s = p.data.synthetic
    meta, splits = build(p.data, p.seed)
    n_cls = s.superclasses * s.classes_per_superclass
    assert len(meta.classes) == n_cls and len(meta.superclasses) == s.superclasses
    assert meta.class_superclass == [c // s.classes_per_superclass for c in range(n_cls)]
    assert meta.image_size == p.data.image_size
    for name, (x, y) in splits.items():
        assert x.dtype == np.uint8 and x.shape[1:] == (p.data.image_size,) * 2 + (3,), name
        assert y.dtype == np.int64 and len(x) == len(y)
        assert set(np.unique(y)) == set(range(n_cls)), name
    assert len(splits["test"][1]) == n_cls * s.test_per_class
    assert len(splits["train"][1]) + len(splits["val"][1]) == n_cls * s.train_per_class
    # Images are not blank or saturated: a usable dynamic range.
    x = splits["train"][0]
    assert 60 < x.mean() < 200 and x.std() > 20


def test_default_synthetic_has_at_least_8x4_classes():
    from conftest import ROOT

    from tailor.config import load_params

    s = load_params(ROOT / "params.yaml").data.synthetic
    assert s.superclasses >= 8 and s.classes_per_superclass >= 4


def test_synthetic_classes_of_a_superclass_look_alike():
    # Hierarchy: images of one superclass are closer to each other than to other superclasses'.
    p = tiny_params(data={"synthetic": {"noise": 0.0}})
    _, (x, y), _ = datamod.make_synthetic(p.data.synthetic, 32, seed=0)
    C = p.data.synthetic.classes_per_superclass
    means = np.stack([x[y == c].astype(np.float64).mean(0).ravel() for c in range(y.max() + 1)])
    d = np.linalg.norm(means[:, None] - means[None], axis=-1)
    sc = np.arange(len(means)) // C
    same = d[(sc[:, None] == sc[None]) & ~np.eye(len(means), dtype=bool)]
    other = d[sc[:, None] != sc[None]]
    assert same.mean() < 0.7 * other.mean()


# ---------------------------------------------------------------- splits
def test_stratified_split():
    y = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    keep, held = stratified_split(y, 0.2, seed=0)
    assert len(np.intersect1d(keep, held)) == 0
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(len(y)))
    for c, n in enumerate([10, 20, 30, 40, 50]):
        assert (y[held] == c).sum() == round(0.2 * n)
    keep2, held2 = stratified_split(y, 0.2, seed=0)
    assert np.array_equal(held, held2)
    _, held3 = stratified_split(y, 0.2, seed=1)
    assert not np.array_equal(held, held3)
    with pytest.raises(DataError, match="class 0 has only 1"):
        stratified_split(np.array([0, 1, 1, 1]), 0.3, seed=0)


def test_build_holds_val_out_of_train_and_leaves_test_untouched():
    p = tiny_params()
    cfg = p.data
    _, (x_tr, y_tr), (x_te, y_te) = datamod.make_synthetic(cfg.synthetic, cfg.image_size, p.seed)
    meta, s = build(cfg, p.seed)
    assert np.array_equal(s["test"][0], x_te) and np.array_equal(s["test"][1], y_te)
    # train + val is exactly the original train set, as a partition of its images.
    flat = lambda a: {bytes(r) for r in a.reshape(len(a), -1)}  # noqa: E731
    assert flat(s["train"][0]) | flat(s["val"][0]) == flat(x_tr)
    assert not flat(s["train"][0]) & flat(s["val"][0])
    per_class = cfg.synthetic.train_per_class
    for c in range(len(meta.classes)):
        assert (s["val"][1] == c).sum() == round(cfg.val_fraction * per_class)
    # The normalisation statistics come from the train split only.
    tr = s["train"][0].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(meta.mean, tr.mean(0), atol=1e-6)
    np.testing.assert_allclose(meta.std, tr.std(0), atol=1e-6)


def test_prepare_data_writes_a_loadable_dataset(tmp_path):
    p = tiny_params()
    out = tmp_path / "prepared"
    m = stages.prepare_data(p, out, tmp_path / "m" / "data.json")
    meta = Meta.load(out)
    _, s = build(p.data, p.seed)
    for split in ("train", "val", "test"):
        x, y = datamod.load_split(out, split)
        assert np.array_equal(x, s[split][0]) and np.array_equal(y, s[split][1])
        assert m[f"{split}_images"] == len(y)
    info = json.loads((out / "meta.json").read_text())
    assert info["params"]["data"] == p.data.model_dump(mode="json") and "code_version" in info
    assert meta.classes_of(1) == [2, 3]
    with pytest.raises(DataError, match="unknown superclass 'nope'"):
        meta.superclass_index("nope")
    # Nothing half-written is left beside the output.
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m", "prepared"]


# ---------------------------------------------------------------- imagefolder
COLOURS = {"cat": (200, 30, 30), "lion": (30, 200, 30), "carp": (30, 30, 200), "trout": (200, 200, 30)}
MAP = {"felines": ["cat", "lion"], "fish": ["trout", "carp"]}


def make_tree(root: Path, fmt: str = "PNG", size: int = 20, n_train: int = 5, n_test: int = 2,
              with_map: bool = True) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        for cls, col in COLOURS.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = np.zeros((size, size, 3), np.uint8) + np.array(col, np.uint8)
                img[0, 0] = i  # images of a class differ
                Image.fromarray(img).save(d / f"im{i}.{fmt.lower()}", fmt)
    (root / "train" / "cat" / "notes.txt").write_text("not an image: ignored")
    if with_map:
        (root / "superclasses.yaml").write_text(yaml.safe_dump(MAP, sort_keys=False))
    return root


def zip_tree(root: Path, zpath: Path, prefix: str = "tiny/") -> Path:
    with zipfile.ZipFile(zpath, "w") as z:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                z.write(f, prefix + f.relative_to(root).as_posix())
    return zpath


def imagefolder_cfg(path, **kw):
    return tiny_params(data={"source": "imagefolder", "path": str(path), "image_size": 16, **kw}).data


def check_tree_dataset(meta, s, lossless=True):
    assert meta.superclasses == ["felines", "fish"]
    assert meta.classes == ["cat", "lion", "trout", "carp"]  # grouped by superclass, in the map's order
    assert meta.class_superclass == [0, 0, 1, 1]
    assert meta.source == "imagefolder"
    assert len(s["train"][1]) + len(s["val"][1]) == 4 * 5 and len(s["test"][1]) == 4 * 2
    for split in ("train", "val", "test"):
        x, y = s[split]
        assert x.shape[1:] == (16, 16, 3)
        for img, c in zip(x, y):
            centre = img[8, 8].astype(int)
            want = np.array(COLOURS[meta.classes[c]])
            assert np.abs(centre - want).max() <= (0 if lossless else 8), (split, meta.classes[c], centre)


def test_imagefolder_directory(tmp_path):
    root = make_tree(tmp_path / "tree")
    meta, s = build(imagefolder_cfg(root), seed=0)
    check_tree_dataset(meta, s)


def test_imagefolder_zip_with_jpegs(tmp_path):
    root = make_tree(tmp_path / "tree", fmt="JPEG")
    z = zip_tree(root, tmp_path / "tiny.zip")
    meta, s = build(imagefolder_cfg(z), seed=0)
    check_tree_dataset(meta, s, lossless=False)
    # Same data from the zip as from the directory.
    meta_d, s_d = build(imagefolder_cfg(root), seed=0)
    assert meta_d == meta
    for k in s:
        assert np.array_equal(s[k][0], s_d[k][0]) and np.array_equal(s[k][1], s_d[k][1])


def test_imagefolder_external_superclass_map(tmp_path):
    root = make_tree(tmp_path / "tree", with_map=False)
    z = zip_tree(root, tmp_path / "tiny.zip", prefix="")
    with pytest.raises(DataError, match="no superclasses.yaml .*set data.superclass_map"):
        build(imagefolder_cfg(z), seed=0)
    m = tmp_path / "map.yaml"
    m.write_text(yaml.safe_dump({"fish": ["carp", "trout"], "felines": ["lion", "cat"]}, sort_keys=False))
    meta, _ = build(imagefolder_cfg(z, superclass_map=str(m)), seed=0)
    assert meta.superclasses == ["fish", "felines"] and meta.classes == ["carp", "trout", "lion", "cat"]
    with pytest.raises(DataError, match="missing.yaml: superclass map not found"):
        build(imagefolder_cfg(z, superclass_map=str(tmp_path / "missing.yaml")), seed=0)


def _same(a, b):
    (meta_a, s_a), (meta_b, s_b) = a, b
    assert meta_a == meta_b
    for k in s_a:
        assert np.array_equal(s_a[k][0], s_b[k][0]) and np.array_equal(s_a[k][1], s_b[k][1])


def test_imagefolder_from_s3_as_a_zip_object_or_a_prefix(tmp_path, s3_env, monkeypatch):
    """data.path as s3://bucket/key.zip or s3://bucket/prefix (the tree's files), read through the
    tests' S3 server: the same dataset as from the local files, no temporary copy left behind."""
    import tempfile

    from tailor.export import S3Config, s3_client

    s3 = S3Config(max_attempts=2, connect_timeout_s=5, read_timeout_s=20)
    root = make_tree(tmp_path / "tree")
    z = zip_tree(root, tmp_path / "tiny.zip")
    client = s3_client(s3)
    client.create_bucket(Bucket="datasets")
    client.upload_file(str(z), "datasets", "sets/tiny.zip")
    for f in sorted(root.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), "datasets", f"trees/tiny/{f.relative_to(root).as_posix()}")
    client.put_object(Bucket="datasets", Key="maps/fish-first.yaml",
                      Body=yaml.safe_dump({"fish": ["carp", "trout"], "felines": ["lion", "cat"]}, sort_keys=False).encode())
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))

    _same(build(imagefolder_cfg("s3://datasets/sets/tiny.zip"), seed=0, s3=s3), build(imagefolder_cfg(z), seed=0))
    _same(build(imagefolder_cfg("s3://datasets/trees/tiny"), seed=0, s3=s3), build(imagefolder_cfg(root), seed=0))
    meta, _ = build(imagefolder_cfg("s3://datasets/sets/tiny.zip", superclass_map="s3://datasets/maps/fish-first.yaml"),
                    seed=0, s3=s3)
    assert meta.superclasses == ["fish", "felines"]
    assert list(tmp.iterdir()) == []  # the downloads were temporary
    for bad, culprit in [("s3://datasets/sets/missing.zip", "s3://datasets/sets/missing.zip"),
                         ("s3://no-such-bucket/tiny", "s3://no-such-bucket/tiny")]:
        with pytest.raises(DataError, match=culprit):
            build(imagefolder_cfg(bad), seed=0, s3=s3)
    with pytest.raises(DataError, match="s3://datasets/maps/none.yaml: superclass map not readable"):
        build(imagefolder_cfg(z, superclass_map="s3://datasets/maps/none.yaml"), seed=0, s3=s3)
    assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("mapping, needles", [
    ({"felines": ["cat", "lion", "carp"], "fish": ["trout", "carp"]}, ["'carp'", "'felines'", "'fish'"]),
    ({"felines": ["cat", "lion", "tiger"], "fish": ["trout", "carp"]}, ["not in the data", "tiger"]),
    ({"felines": ["cat"], "fish": ["trout", "carp"]}, ["in no superclass", "lion"]),
    ({"felines": ["cat", "lion"], "fish": ["trout", "carp"], "birds": []}, ["'birds' is empty"]),
    ({"felines": ["cat", "lion"], "fish": ["trout", "carp"], "birds": None}, ["'birds' is empty"]),
    (["cat", "lion"], ["expected a mapping"]),
])
def test_bad_superclass_maps_are_rejected_naming_the_problem(tmp_path, mapping, needles):
    root = make_tree(tmp_path / "tree", with_map=False)
    (root / "superclasses.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
    with pytest.raises(DataError) as e:
        build(imagefolder_cfg(root), seed=0)
    msg = str(e.value)
    assert "superclasses.yaml" in msg
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg


def test_check_superclass_map_reports_every_problem_at_once():
    with pytest.raises(DataError) as e:
        check_superclass_map({"a": ["x", "y"], "b": ["y", "q"], "c": []}, ["x", "y", "z"], "m.yaml")
    msg = str(e.value)
    for n in ("'y' is in both 'a' and 'b'", "'c' is empty", "['q']", "['z']", "m.yaml"):
        assert n in msg


def test_unreadable_image_is_named(tmp_path):
    root = make_tree(tmp_path / "tree")
    (root / "train" / "lion" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError) as e:
        build(imagefolder_cfg(root), seed=0)
    assert "broken.png" in str(e.value) and "1 unreadable" in str(e.value)
    z = zip_tree(root, tmp_path / "t.zip")
    with pytest.raises(DataError, match=r"t\.zip:tiny/train/lion/broken\.png"):
        build(imagefolder_cfg(z), seed=0)


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory or a zip"):
        build(imagefolder_cfg(tmp_path / "nothing"), seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train/<class>/<image>"):
        build(imagefolder_cfg(tmp_path / "empty"), seed=0)
    root = make_tree(tmp_path / "tree")
    for f in (root / "test" / "carp").iterdir():
        f.unlink()
    (root / "test" / "carp").rmdir()
    with pytest.raises(DataError, match=r"no test images: \['carp'\]"):
        build(imagefolder_cfg(root), seed=0)


# ---------------------------------------------------------------- cifar100
def fake_cifar100(root: Path, per_class: int = 2, test_per_class: int = 1) -> dict:
    """A tiny cifar-100-python/ in torchvision's pickle format, with a shuffled fine -> coarse map."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    fine_names = [f"fine{i:02d}" for i in range(100)]
    coarse_names = [f"coarse{i:02d}" for i in range(20)]
    coarse_of = rng.permutation(np.repeat(np.arange(20), 5))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": fine_names, "coarse_label_names": coarse_names}))
    for split, n in (("train", per_class), ("test", test_per_class)):
        fine = rng.permutation(np.repeat(np.arange(100), n))
        data = np.zeros((len(fine), 3072), np.uint8)
        data[:, :1024] = fine[:, None]          # red = fine label
        data[:, 1024:2048] = 100 + coarse_of[fine][:, None]  # green = 100 + coarse label
        data[:, 2048:] = np.arange(1024) % 256  # blue: a ramp, to check the CHW -> HWC layout
        d = {"data": data, "fine_labels": fine.tolist(), "coarse_labels": coarse_of[fine].tolist()}
        (base / split).write_bytes(pickle.dumps(d))
    return {"fine": fine_names, "coarse": coarse_names, "coarse_of": coarse_of}


def test_cifar100_from_local_pickles(tmp_path):
    info = fake_cifar100(tmp_path)
    cfg = tiny_params(data={"source": "cifar100", "path": str(tmp_path), "image_size": 32, "val_fraction": 0.2}).data
    meta, s = build(cfg, seed=0)
    assert meta.superclasses == info["coarse"]
    assert len(meta.classes) == 100 and sorted(meta.classes) == info["fine"]
    for c, name in enumerate(meta.classes):
        assert meta.class_superclass[c] == info["coarse_of"][info["fine"].index(name)]
    # Classes of one superclass have contiguous indices.
    assert meta.class_superclass == sorted(meta.class_superclass)
    assert (len(s["train"][1]), len(s["val"][1]), len(s["test"][1])) == (100, 100, 100)
    for split in ("train", "val", "test"):
        x, y = s[split]
        assert x.shape[1:] == (32, 32, 3)
        fine_idx = np.array([info["fine"].index(meta.classes[c]) for c in y])
        assert np.array_equal(x[:, 5, 7, 0], fine_idx)
        assert np.array_equal(x[:, 5, 7, 1], 100 + np.array(meta.class_superclass)[y])
        assert np.array_equal(x[0, :, :, 2].ravel(), np.arange(1024) % 256)
    bad = tiny_params(data={"source": "cifar100", "path": str(tmp_path), "image_size": 16}).data
    with pytest.raises(DataError, match="CIFAR-100 is 32x32"):
        build(bad, seed=0)


def test_cifar100_missing_without_download_is_a_clear_error(tmp_path):
    cfg = tiny_params(data={"source": "cifar100", "path": str(tmp_path / "c100"), "image_size": 32}).data
    assert cfg.allow_download is False
    with pytest.raises(DataError, match=r"c100/cifar-100-python: CIFAR-100 not found and data.allow_download is false"):
        build(cfg, seed=0)


# ---------------------------------------------------------------- Batches
def batches_for(x, y, **kw):
    meta = Meta(classes=[f"c{i}" for i in range(4)], superclasses=["a", "b"], class_superclass=[0, 0, 1, 1],
                image_size=x.shape[1], mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3], source="test")
    return meta, Batches(x, y, meta, torch.device("cpu"), **kw)


def small_set(n=37, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 4, n).astype(np.int64)


def test_batches_normalise_and_keep_order_without_a_seed():
    x, y = small_set()
    meta, b = batches_for(x, y, batch_size=10)
    assert b.num_batches(drop_last=True) == 3 and b.num_batches(drop_last=False) == 4
    got = list(b.epoch(None, augment=False, drop_last=False))
    assert [len(g[1]) for g in got] == [10, 10, 10, 7]
    xs = torch.cat([g[0] for g in got])
    ys = torch.cat([g[1] for g in got])
    assert torch.equal(ys, torch.from_numpy(y))
    assert torch.equal(torch.cat([g[2] for g in got]), torch.tensor(meta.class_superclass)[ys])
    mean = torch.tensor(meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(meta.std).view(1, 3, 1, 1)
    raw = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(xs, (raw - mean) / std, rtol=1e-5, atol=1e-5)


def test_batches_order_and_augmentation_are_seeded():
    x, y = small_set()
    _, b = batches_for(x, y, batch_size=8, pad_crop=2, flip=True)
    a1 = list(b.epoch(5, augment=True))
    a2 = list(b.epoch(5, augment=True))
    a3 = list(b.epoch(6, augment=True))
    assert len(a1) == 4  # drop_last by default for training
    for p, q in zip(a1, a2):
        assert torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
    assert not all(torch.equal(p[1], q[1]) for p, q in zip(a1, a3))
    # A seeded epoch is a permutation: no image twice.
    _, b1 = batches_for(x, y, batch_size=37)
    (xb, yb, _), = list(b1.epoch(5, augment=False))
    assert sorted(yb.tolist()) == sorted(y.tolist())
    assert len({tuple(r.flatten().tolist()) for r in xb}) == 37


def unnormalise(b: Batches, xb: torch.Tensor) -> torch.Tensor:
    return (xb * b.std + b.mean).round()


def test_pad_crop_and_flip_augmentation():
    x, y = small_set(n=64, size=8, seed=1)
    meta, b = batches_for(x, y, batch_size=64, pad_crop=2, flip=True, channels_last=True)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(64, generator=g)
    (xb, yb, _), = list(b.epoch(0, augment=True))
    assert xb.shape == (64, 3, 8, 8) and xb.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(yb, torch.from_numpy(y)[order])
    imgs = unnormalise(b, xb)
    src = torch.from_numpy(x).permute(0, 3, 1, 2).float()[order]
    padded = torch.nn.functional.pad(src, (2, 2, 2, 2), mode="reflect")
    shifted = flipped = 0
    for i in range(64):
        ok = False
        for oy in range(5):
            for ox in range(5):
                crop = padded[i, :, oy:oy + 8, ox:ox + 8]
                for f in (False, True):
                    if torch.equal(imgs[i], crop.flip(2) if f else crop):
                        ok = True
                        shifted += (oy, ox) != (2, 2)
                        flipped += f
                        break
                if ok:
                    break
            if ok:
                break
        assert ok, f"image {i} is not a (flipped) crop of its padded source"
    assert shifted > 32 and 10 < flipped < 54
    # Without augmentation the images come through unchanged.
    (xe, _, _), = list(b.epoch(0, augment=False))
    assert torch.equal(unnormalise(b, xe), src)


# ---------------------------------------------------------------- real data
@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.skipif(not TIN_SC10.exists(), reason=f"{TIN_SC10} is absent")
def test_tin_sc10_loads_as_imagefolder():
    cfg = tiny_params(data={"source": "imagefolder", "path": str(TIN_SC10), "image_size": 64,
                            "val_fraction": 0.1}).data
    meta, s = build(cfg, seed=0)
    assert len(meta.superclasses) == 10 and len(meta.classes) == 50
    assert set(meta.superclasses) == {"dog", "cat", "insect", "car", "fruit", "dish", "sea_life", "crawler", "herp",
                                      "landscape"}
    assert all(meta.class_superclass.count(i) == 5 for i in range(10))
    assert all(c.startswith("n") and len(c) == 9 for c in meta.classes)  # WordNet ids
    assert (len(s["train"][1]), len(s["val"][1]), len(s["test"][1])) == (22_500, 2_500, 2_500)
    for x, y in s.values():
        assert x.shape[1:] == (64, 64, 3) and np.bincount(y, minlength=50).min() > 0
    assert 50 < s["train"][0][:500].mean() < 200
