"""What the training stages share: the device, the data on it, the search space; supernet checkpoints.

Stage bodies (tailor.stages, tailor.supernet_training, tailor.stock, tailor.search) build a
`Context` from params and a prepared data dir; every artifact they write records `provenance`.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from tailor import data as datamod
from tailor.config import Params
from tailor.data import Batches, Meta
from tailor.space import Arch, SearchSpace
from tailor.supernet import SuperNet, recalibrate_bn
from tailor.train import autocast, evaluate, resolve_device, split_by_superclass
from tailor.utils import CheckpointError, atomic_torch_save, load_checkpoint, load_state, provenance  # noqa: F401


class Context:
    """What the training stages share: device, data on it, the search space."""

    def __init__(self, p: Params, data_dir: Path):
        self.p, self.data_dir = p, Path(data_dir)
        self.meta = Meta.load(data_dir)
        self.device = resolve_device(p.runtime)
        self.num_classes = len(self.meta.classes)
        self._batches: dict[str, Batches] = {}

    @functools.cached_property
    def space(self) -> SearchSpace:
        # On first use: the stock anchors' stage shares the context but not the space (nor params.space).
        return SearchSpace(self.p.space, self.meta.image_size)

    def batches(self, split: str, batch_size: int | None = None, augment: bool | None = None) -> Batches:
        """`split` in batches of `batch_size` (default runtime.eval_batch_size). `augment`: whether they
        carry params.augment for training (default: the train split's do). Only those read it, so the
        stages that never augment (search) do not depend on params.augment."""
        augment = split == "train" if augment is None else augment
        key = f"{split}:{batch_size}:{augment}"
        if key not in self._batches:
            x, y = datamod.load_split(self.data_dir, split)
            rt = self.p.runtime
            on_device = True
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info()
                on_device = x.nbytes <= rt.device_data_fraction * free
            aug = {"pad_crop": self.p.augment.pad_crop, "flip": self.p.augment.flip} if augment else {}
            self._batches[key] = Batches(x, y, self.meta, self.device, batch_size or rt.eval_batch_size,
                                         on_device=on_device, channels_last=rt.channels_last, **aug)
        return self._batches[key]

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.p.runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def recal_batches(self, seed: int):
        """A fixed, seeded sample of un-augmented training batches for BN recalibration."""
        b = self.batches("train", self.p.runtime.bn_recal_batch_size, augment=False)
        it = b.epoch(seed, augment=False)
        return [next(it)[0] for _ in range(min(self.p.runtime.bn_recal_batches, b.num_batches(True)))]

    def evaluate_subnet(self, supernet: SuperNet, arch: Arch, splits=("val", "test"), per_image: bool = False) -> dict:
        """Extract `arch`, recalibrate its BN on training batches, and score it on each split.

        `per_image` adds the test hits split by superclass ("test_correct"), for paired comparisons."""
        net = self.prepare_model(supernet.extract(arch))
        recalibrate_bn(net, self.recal_batches(self.p.seed))
        net.eval()
        out = {"arch": str(arch), "madds": self.space.madds(arch, self.num_classes)}
        with autocast(self.device, self.p.runtime):
            for split in splits:
                out[split] = evaluate(net, self.batches(split), self.meta, per_image=per_image and split == "test")
        if per_image and "test" in splits:
            out["test_correct"] = split_by_superclass(out["test"].pop("correct"), self.batches("test").y_cpu.numpy(),
                                                      self.meta)
        return out


def save_supernet(path: Path, model: SuperNet, ctx: Context, p: Params, stage: str, extra: dict) -> None:
    atomic_torch_save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                       "num_classes": ctx.num_classes, "image_size": ctx.meta.image_size,
                       "meta": ctx.meta.__dict__, **provenance(p, stage), **extra}, path)


def load_supernet(path: Path, device: torch.device | str = "cpu", ctx: "Context | None" = None) -> tuple[SuperNet, dict]:
    """A SuperNet rebuilt from its checkpoint's own recorded space config. With `ctx`, one that was
    trained for another space, image size or class count than ctx's params and data is refused in
    one line (its weights would otherwise be read into the wrong network, or silently used)."""
    from tailor.config import SpaceConfig

    ck = load_checkpoint(path, "supernet", ("params", "image_size", "num_classes", "state_dict"))
    if ctx is not None:
        if ck["params"]["space"] != ctx.p.space.model_dump(mode="json") or ck["image_size"] != ctx.meta.image_size:
            raise CheckpointError(f"supernet {path}: trained for another search space or image size than params.space"
                                  f" / {ctx.data_dir}; re-run train-supernet")
        if ck["num_classes"] != ctx.num_classes:
            raise CheckpointError(f"supernet {path}: {ck['num_classes']} classes, {ctx.data_dir} has {ctx.num_classes}")
    space = SearchSpace(SpaceConfig.model_validate(ck["params"]["space"]), ck["image_size"])
    net = SuperNet(space, ck["num_classes"], els=any(k.startswith("els.") for k in ck["state_dict"]))
    load_state(net, ck["state_dict"], path, "supernet")
    return net.to(device), ck


def _summary(evals: dict) -> dict:
    return {name: {"arch": e["arch"], "madds_m": round(e["madds"] / 1e6, 3),
                   **{f"{s}_sc_top1_mean": e[s]["sc_top1_mean"] for s in ("val", "test")},
                   **{f"{s}_top1": e[s]["top1"] for s in ("val", "test")},
                   "test_images_per_s": e["test"]["images_per_s"], "test_sc_top1": e["test"]["sc_top1"],
                   **({"test_correct": e["test_correct"]} if "test_correct" in e else {})}
            for name, e in evals.items()}


# ---------------------------------------------------------------- specialised (retrained) models
def save_specialized(path: Path, net: torch.nn.Module, ctx: Context, p: Params, arch: Arch, superclass: str,
                     budget: float, classes: list[int], extra: dict) -> None:
    atomic_torch_save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "arch": str(arch),
                       "superclass": superclass, "budget": budget, "classes": classes,
                       "class_names": [ctx.meta.classes[c] for c in classes], "image_size": ctx.meta.image_size,
                       "mean": ctx.meta.mean, "std": ctx.meta.std, **provenance(p, "retrain"), **extra}, path)


def load_specialized(path: Path, device: torch.device | str = "cpu"):
    """(StaticNet for one superclass's classes, its checkpoint dict)."""
    from tailor.config import SpaceConfig
    from tailor.nets import StaticNet

    ck = load_checkpoint(path, "specialised model", ("params", "image_size", "arch", "classes", "state_dict"))
    space = SearchSpace(SpaceConfig.model_validate(ck["params"]["space"]), ck["image_size"])
    net = StaticNet(space, Arch.parse(ck["arch"]), len(ck["classes"]))
    load_state(net, ck["state_dict"], path, "specialised model")
    return net.to(device).eval(), ck
