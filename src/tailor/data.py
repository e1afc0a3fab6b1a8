"""Superclass datasets: build (prepare-data), store, load, and feed them to training.

A prepared dataset is a directory:
    meta.json                 classes, superclasses, class -> superclass, mean/std, provenance
    {train,val,test}/x.npy    uint8 images, (N, H, W, 3)
    {train,val,test}/y.npy    int64 class indices
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import yaml

from tailor.config import DataConfig, Params, SyntheticConfig, declares
from tailor.export.settings import S3Config
from tailor.utils import atomic_dir, atomic_write_json, check_replaceable, log, provenance

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


class DataError(ValueError):
    """The data source or its superclass map is unusable; the message names what and where."""


@dataclass(frozen=True)
class Meta:
    classes: list[str]
    superclasses: list[str]
    class_superclass: list[int]  # superclass index of each class
    image_size: int
    mean: list[float]
    std: list[float]
    source: str

    def classes_of(self, superclass: int) -> list[int]:
        return [c for c, s in enumerate(self.class_superclass) if s == superclass]

    def superclass_index(self, name: str) -> int:
        try:
            return self.superclasses.index(name)
        except ValueError:
            raise DataError(f"unknown superclass {name!r}; the dataset has {self.superclasses}") from None

    @classmethod
    def load(cls, data_dir: str | Path) -> "Meta":
        f = Path(data_dir) / "meta.json"
        if not f.is_file():
            raise DataError(f"{data_dir}: not a prepared dataset (no meta.json); run `tailor prepare-data` first")
        return cls(**json.loads(f.read_text())["meta"])


# ---------------------------------------------------------------- superclass maps
def check_superclass_map(mapping: object, classes: list[str], source: str) -> dict[str, list[str]]:
    """Reject maps with empty superclasses, classes in two superclasses, unknown or unmapped classes."""
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"{source}: expected a mapping superclass -> list of classes")
    problems, owner = [], {}
    for sc, members in mapping.items():
        if not members:
            problems.append(f"superclass {sc!r} is empty")
            continue
        if not isinstance(members, list):
            problems.append(f"superclass {sc!r}: expected a list of classes, got {type(members).__name__}")
            continue
        if len(members) < 2:
            # One class: superclass-restricted top-1 is a trivial 100% that would lift every mean.
            problems.append(f"superclass {sc!r} has one class ({members[0]!r}); a superclass needs >= 2")
        for c in members:
            c = str(c)
            if c in owner:
                problems.append(f"class {c!r} is in both {owner[c]!r} and {sc!r}")
            owner[c] = sc
    known = set(classes)
    unknown = sorted(set(owner) - known)
    if unknown:
        problems.append(f"classes not in the data: {unknown}")
    missing = sorted(known - set(owner))
    if missing:
        problems.append(f"classes in no superclass: {missing}")
    if problems:
        raise DataError(f"{source}: bad superclass map: " + "; ".join(problems))
    return {str(sc): [str(c) for c in m] for sc, m in mapping.items()}


def _order(mapping: dict[str, list[str]]):
    """Classes grouped by superclass, in the map's order: class index ranges stay contiguous."""
    superclasses = list(mapping)
    classes = [c for sc in superclasses for c in mapping[sc]]
    class_sc = [i for i, sc in enumerate(superclasses) for _ in mapping[sc]]
    return classes, superclasses, class_sc


# ---------------------------------------------------------------- synthetic
def make_synthetic(cfg: SyntheticConfig, size: int, seed: int):
    """Hierarchical images: a superclass is a colour-blob layout, a class adds an oriented grating
    and a small motif. Classes of one superclass share the layout, so telling them apart needs
    the fine texture under noise, jitter and distractors - capacity helps."""
    rng = np.random.default_rng(seed)
    S, C = cfg.superclasses, cfg.classes_per_superclass
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    layouts = np.zeros((S, 3, size, size), np.float32)
    for s in range(S):
        for _ in range(4):
            cx, cy = rng.uniform(0.15, 0.85, 2)
            sig = rng.uniform(0.1, 0.25)
            layouts[s] += rng.uniform(-1, 1, 3)[:, None, None] * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sig ** 2))
    n_cls = S * C
    base_theta = rng.uniform(0, np.pi, S)
    theta = np.array([base_theta[c // C] + (c % C) * np.pi / (2 * C) for c in range(n_cls)])
    freq = np.array([rng.uniform(3, 6) for _ in range(n_cls)])
    colour = (rng.choice([-1.0, 1.0], (n_cls, 3)) * rng.uniform(0.5, 1.0, (n_cls, 3))).astype(np.float32)
    motifs = rng.choice([-1.0, 1.0], (n_cls, 5, 5)).astype(np.float32)

    def render(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(labels)
        sc = labels // C
        shift = rng.integers(-3, 4, (n, 2))
        img = np.stack([np.roll(layouts[s], tuple(d), (1, 2)) for s, d in zip(sc, shift)])
        img *= rng.uniform(0.6, 1.4, (n, 1, 1, 1)).astype(np.float32)
        th = theta[labels] + rng.normal(0, 0.08, n)
        fr = freq[labels] * rng.uniform(0.9, 1.1, n)
        ph = rng.uniform(0, 2 * np.pi, n)
        u = np.cos(th)[:, None, None] * xx + np.sin(th)[:, None, None] * yy
        grating = np.sin(2 * np.pi * fr[:, None, None] * u + ph[:, None, None]).astype(np.float32)
        img += cfg.class_signal * colour[labels][:, :, None, None] * grating[:, None]
        # The motif sits at a random place: finding it needs receptive field, not just colour.
        pos = rng.integers(0, size - 5, (n, 2))
        for i in range(n):
            y0, x0 = pos[i]
            img[i, :, y0:y0 + 5, x0:x0 + 5] += 1.5 * cfg.class_signal * motifs[labels[i]]
        img += cfg.noise * rng.standard_normal(img.shape).astype(np.float32)
        return np.clip(128 + 60 * img, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)

    names = [f"sc{s}_c{c}" for s in range(S) for c in range(C)]
    mapping = {f"sc{s}": names[s * C:(s + 1) * C] for s in range(S)}
    y_train = np.repeat(np.arange(n_cls), cfg.train_per_class)
    y_test = np.repeat(np.arange(n_cls), cfg.test_per_class)
    return mapping, (render(y_train, rng), y_train), (render(y_test, rng), y_test)


# ---------------------------------------------------------------- imagefolder (dir or zip)
class _Tree:
    """Read-only view of a directory or a zip file, so both layouts share one loader."""

    def __init__(self, path: Path, label: str | None = None):
        self.path = path
        self.label = label or str(path)  # what messages name: the user's path or s3:// URI, not a temp copy
        if path.is_file() and zipfile.is_zipfile(path):
            self.zip = zipfile.ZipFile(path)
            names = [n for n in self.zip.namelist() if not n.endswith("/")]
            self.files = [PurePosixPath(n) for n in names]
        elif path.is_dir():
            self.zip = None
            self.files = [PurePosixPath(p.relative_to(path).as_posix()) for p in path.rglob("*") if p.is_file()]
        else:
            raise DataError(f"{self.label}: not a directory or a zip file")
        # The root is the folder holding train/ (tin-sc10.zip keeps everything under tin-sc10/).
        roots = {f.parents[2] for f in self.files if len(f.parts) >= 3 and f.parts[-3] == "train"}
        if len(roots) != 1:
            raise DataError(f"{self.label}: expected exactly one train/<class>/<image> tree, found {len(roots)}")
        self.root = roots.pop()

    def read(self, rel: PurePosixPath) -> bytes:
        if self.zip is not None:
            return self.zip.read(str(rel))
        return (self.path / rel).read_bytes()

    def exists(self, rel: PurePosixPath) -> bool:
        return rel in set(self.files)

    def images(self, split: str) -> dict[str, list[PurePosixPath]]:
        out: dict[str, list[PurePosixPath]] = {}
        base = self.root / split
        for f in self.files:
            if f.parent.parent == base and f.suffix.lower() in IMAGE_SUFFIXES:
                out.setdefault(f.parent.name, []).append(f)
        return {c: sorted(v) for c, v in sorted(out.items())}


def _decode(tree: _Tree, files: list[PurePosixPath], size: int) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(files), size, size, 3), np.uint8)
    bad = []
    for i, f in enumerate(files):
        try:
            with Image.open(io.BytesIO(tree.read(f))) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                out[i] = np.asarray(im)
        except Exception as e:  # PIL raises many types for broken files
            bad.append(f"{tree.label}:{f} ({type(e).__name__}: {e})")
    if bad:
        raise DataError(f"{len(bad)} unreadable image(s): " + "; ".join(bad[:10]) + (" ..." if len(bad) > 10 else ""))
    return out


def _yaml_map(text, source: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise DataError(f"{source}: superclass map is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None


@contextlib.contextmanager
def _local(path: str, s3: S3Config | None):
    """data.path as a local path: itself, or an s3:// URI fetched to a temporary location (removed
    afterwards): an object ending in .zip is downloaded as the zip, any other prefix as a tree.
    Credentials come from boto3's default chain, as for export's upload (tailor.export.s3)."""
    if not path.startswith("s3://"):
        yield Path(path)
        return
    from botocore.exceptions import BotoCoreError, ClientError

    from tailor.export.s3 import S3Error, download_repository, parse_s3_url, s3_client

    if s3 is None:
        raise ValueError(f"data.path {path}: reading s3:// needs the export.s3 settings (build(..., s3=p.export.s3))")
    try:
        url = parse_s3_url(path)
    except ValueError as e:
        raise DataError(f"data.path {path}: {e}") from None
    with tempfile.TemporaryDirectory(prefix="tailor-data-") as tmp:
        try:
            client = s3_client(s3)
            if url.prefix.endswith(".zip"):
                local = Path(tmp) / PurePosixPath(url.prefix).name
                client.download_file(url.bucket, url.prefix, str(local))
            else:
                local = Path(tmp) / "tree"
                download_repository(path, local, client)
        except (S3Error, ClientError, BotoCoreError) as e:
            raise DataError(f"data.path {path}: {e}") from None
        yield local


def _read_text(path: str, s3: S3Config | None) -> str:
    """A small text file (the superclass map) from a local path or an s3:// URI."""
    if not path.startswith("s3://"):
        return Path(path).read_text()
    from botocore.exceptions import BotoCoreError, ClientError

    from tailor.export.s3 import S3Error, parse_s3_url, s3_client

    if s3 is None:
        raise ValueError(f"{path}: reading s3:// needs the export.s3 settings (build(..., s3=p.export.s3))")
    try:
        url = parse_s3_url(path)
        return s3_client(s3).get_object(Bucket=url.bucket, Key=url.prefix)["Body"].read().decode()
    except (ValueError, S3Error, ClientError, BotoCoreError) as e:
        raise DataError(f"{path}: superclass map not readable: {e}") from None


def load_imagefolder(cfg: DataConfig, s3: S3Config | None = None):
    with _local(cfg.path, s3) as local:
        return _load_tree(cfg, _Tree(local, cfg.path), s3)


def _load_tree(cfg: DataConfig, tree: _Tree, s3: S3Config | None):
    if cfg.superclass_map:
        map_path = cfg.superclass_map
        try:
            raw_map, map_source = _yaml_map(_read_text(map_path, s3), map_path), map_path
        except FileNotFoundError:
            raise DataError(f"{map_path}: superclass map not found") from None
    else:
        rel = tree.root / "superclasses.yaml"
        if not tree.exists(rel):
            raise DataError(f"{cfg.path}: no superclasses.yaml at {rel}; set data.superclass_map")
        raw_map, map_source = _yaml_map(tree.read(rel), f"{cfg.path}:{rel}"), f"{cfg.path}:{rel}"
    train_files = tree.images("train")
    test_files = tree.images("test")
    if not train_files:
        raise DataError(f"{cfg.path}: no images under {tree.root / 'train'}")
    mapping = check_superclass_map(raw_map, list(train_files), map_source)
    classes, _, _ = _order(mapping)
    missing_test = [c for c in classes if c not in test_files]
    if missing_test:
        raise DataError(f"{cfg.path}: classes with no test images: {missing_test}")
    splits = []
    for files in (train_files, test_files):
        flat = [(f, ci) for ci, c in enumerate(classes) for f in files[c]]
        x = _decode(tree, [f for f, _ in flat], cfg.image_size)
        splits.append((x, np.array([ci for _, ci in flat], np.int64)))
    return mapping, splits[0], splits[1]


# ---------------------------------------------------------------- CIFAR-100 (20 coarse superclasses)
def load_cifar100(cfg: DataConfig):
    root = Path(cfg.path)
    base = root / "cifar-100-python"
    if not base.exists():
        if not cfg.allow_download:
            raise DataError(f"{base}: CIFAR-100 not found and data.allow_download is false")
        import torchvision

        torchvision.datasets.CIFAR100(str(root), download=True)
    meta = pickle.loads((base / "meta").read_bytes(), encoding="latin1")
    fine, coarse = meta["fine_label_names"], meta["coarse_label_names"]
    out, fine_to_coarse = [], {}
    for split in ("train", "test"):
        d = pickle.loads((base / split).read_bytes(), encoding="latin1")
        x = np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        for f, c in zip(d["fine_labels"], d["coarse_labels"]):
            fine_to_coarse[f] = c
        out.append((x, np.asarray(d["fine_labels"], np.int64)))
    mapping = {coarse[c]: [fine[f] for f in sorted(fine_to_coarse) if fine_to_coarse[f] == c] for c in range(len(coarse))}
    classes, _, _ = _order(mapping)
    remap = np.array([classes.index(fine[f]) for f in range(len(fine))])
    if cfg.image_size != 32:
        raise DataError(f"data.image_size is {cfg.image_size}; CIFAR-100 is 32x32")
    return mapping, (out[0][0], remap[out[0][1]]), (out[1][0], remap[out[1][1]])


# ---------------------------------------------------------------- prepare
def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): `fraction` of every class held out, at least one image each."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n = max(1, int(round(fraction * len(idx))))
        if n >= len(idx):
            raise DataError(f"class {c} has only {len(idx)} training images: too few to hold out a validation split")
        held.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def build(cfg: DataConfig, seed: int, s3: S3Config | None = None):
    """(meta, {split: (x, y)}) for the configured source; `s3`: how to reach an s3:// data.path."""
    if cfg.source == "synthetic":
        mapping, train, test = make_synthetic(cfg.synthetic, cfg.image_size, seed)
    elif cfg.source == "imagefolder":
        mapping, train, test = load_imagefolder(cfg, s3)
    else:
        mapping, train, test = load_cifar100(cfg)
    classes, superclasses, class_sc = _order(mapping)
    keep, held = stratified_split(train[1], cfg.val_fraction, seed)
    splits = {"train": (train[0][keep], train[1][keep]), "val": (train[0][held], train[1][held]), "test": test}
    x = splits["train"][0].reshape(-1, 3).astype(np.float64) / 255.0
    meta = Meta(classes=classes, superclasses=superclasses, class_superclass=class_sc, image_size=cfg.image_size,
                mean=[round(v, 6) for v in x.mean(0)], std=[round(v, 6) for v in x.std(0)], source=cfg.source)
    return meta, splits


def write(out_dir: Path, meta: Meta, splits: dict, provenance: dict) -> None:
    """Write a prepared dataset into out_dir (the caller makes it atomic by renaming the dir)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in splits.items():
        (out_dir / name).mkdir()
        np.save(out_dir / name / "x.npy", np.ascontiguousarray(x))
        np.save(out_dir / name / "y.npy", y.astype(np.int64))
    counts = {name: int(len(y)) for name, (_, y) in splits.items()}
    (out_dir / "meta.json").write_text(json.dumps({"meta": meta.__dict__, "counts": counts, **provenance}, indent=1))


def load_split(data_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    d = Path(data_dir) / split
    out = []
    for name in ("x.npy", "y.npy"):
        try:
            out.append(np.load(d / name))
        except FileNotFoundError:
            raise DataError(f"{d / name}: missing; is {data_dir} a directory prepare-data wrote?") from None
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{d / name}: truncated or corrupt ({e}); re-run prepare-data") from None
    x, y = out
    if len(x) != len(y):
        raise DataError(f"{d}: x.npy has {len(x)} images but y.npy {len(y)} labels; re-run prepare-data")
    return x, y


# ---------------------------------------------------------------- feeding the GPU (or CPU)
class Batches:
    """Mini-batches of one split with augmentation done on the device, in whole-batch tensor ops.

    The uint8 images stay resident on the device when they fit (`on_device`); otherwise they stay
    in pinned host memory and each batch is copied over asynchronously (streaming). Either way the
    order and augmentation come from a generator seeded by (seed, epoch), so a resumed run sees
    exactly the batches an uninterrupted one would have.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, meta: Meta, device: torch.device, batch_size: int,
                 pad_crop: int = 0, flip: bool = False, on_device: bool = True, channels_last: bool = False):
        x_t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW uint8
        self.y_cpu = torch.from_numpy(y)
        self.device, self.batch_size, self.pad_crop, self.flip = device, batch_size, pad_crop, flip
        self.channels_last = channels_last
        self.on_device = on_device or device.type == "cpu"
        if self.on_device:
            self.x, self.y = x_t.to(device), self.y_cpu.to(device)
        else:
            self.x, self.y = x_t.pin_memory(), self.y_cpu.pin_memory()
        self.sc_of_class = torch.tensor(meta.class_superclass, device=device)
        self.mean = torch.tensor(meta.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(meta.std, device=device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return len(self.y_cpu)

    def num_batches(self, drop_last: bool) -> int:
        n = len(self)
        return n // self.batch_size if drop_last else -(-n // self.batch_size)

    def epoch(self, seed: int | None, augment: bool, drop_last: bool = True):
        """Yield (images float NCHW normalised, class labels, superclass labels)."""
        n = len(self)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        order = torch.randperm(n, generator=g) if g is not None else torch.arange(n)
        for b in range(self.num_batches(drop_last)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.on_device:
                idx_d = idx.to(self.device)
                xb, yb = self.x[idx_d], self.y[idx_d]
            else:
                xb = self.x[idx].to(self.device, non_blocking=True)
                yb = self.y[idx].to(self.device, non_blocking=True)
            xb = xb.float()
            if augment:
                xb = self._augment(xb, g)
            xb = (xb - self.mean) / self.std
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb, self.sc_of_class[yb]

    def _augment(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.pad_crop:
            p = self.pad_crop
            xp = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect")
            oy = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=g).to(x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (n, 1, h, 1)
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (n, 1, 1, w)
            bidx = torch.arange(n, device=x.device)[:, None, None, None]
            cidx = torch.arange(3, device=x.device)[None, :, None, None]
            x = xp[bidx, cidx, rows, cols]
        if self.flip:
            m = (torch.rand(n, generator=g) < 0.5).to(x.device)[:, None, None, None]
            x = torch.where(m, x.flip(3), x)
        return x


def prepare_data(p: Params, out_dir: Path, metrics_path: Path, force: bool = False) -> dict:
    """The prepare-data stage: split, decode and write the dataset (the format above) with its metrics.
    It lives here, not in tailor.stages, so the stage loads no training code (dvc.yaml's deps stay
    this module and config / utils)."""
    t0 = time.perf_counter()
    check_replaceable(Path(out_dir), force)  # before minutes of decoding, not after
    meta, splits = build(p.data, p.seed, p.export.s3)
    if declares(p, "search.superclasses") and declares(p, "retrain.scenarios"):
        # Full params (the CLI, DVC): checked by the first stage. A Kubeflow step gets only the keys
        # prepare-data declares, which leave these out so that they do not re-run it; there the
        # retrain-scenarios step checks them, right after this one.
        check_superclass_names(p, meta)
    with atomic_dir(out_dir, force) as tmp:
        write(tmp, meta, splits, provenance(p, "prepare-data"))
    metrics = {"source": p.data.source, "classes": len(meta.classes), "superclasses": len(meta.superclasses),
               **{f"{k}_images": len(v[1]) for k, v in splits.items()}, "image_size": meta.image_size,
               "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_json(metrics_path, metrics)
    log(f"prepare-data: {metrics}")
    return metrics


def check_superclass_names(p: Params, meta: Meta) -> None:
    """Superclasses that params name (search.superclasses, retrain.scenarios) must be the data's:
    checked early, not by the stage that would fail on them hours later."""
    named = [("search.superclasses", s) for s in (p.search.superclasses or [])]
    named += [(f"retrain.scenarios[{i}].superclass", s.superclass) for i, s in enumerate(p.retrain.scenarios)
              if s.superclass is not None]
    bad = [f"{where} {name!r}" for where, name in named if name not in meta.superclasses]
    if bad:
        raise DataError(f"{', '.join(bad)}: not a superclass of the data ({meta.source}: "
                        f"{', '.join(meta.superclasses)})")
