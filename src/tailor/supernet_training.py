"""Training the weight-sharing supernet: which paths a step trains, curriculum growth, the stage body.

Recipes, each a params switch (`supernet.*`), all run by the one loop `train.fit`:
- samplers: `sandwich` (BigNAS / OFA: the phase's largest, uniform ones, its smallest), `spos`
  (uniform paths, SPOS), `fairnas` (FairNAS strict fairness: within a step every choice of every
  slot is trained equally often; gradients of the step's paths accumulate into one update);
- `els`: SCARLET's stabilizers on depth-skipped blocks (tailor.supernet);
- `curriculum` (AdaSearch): the first phase trains a small supernet, each later phase grows it
  function-preservingly (SuperNet2SuperNet: new depth slots as identity blocks, new channels as
  copies with their outgoing weights split, new kernel rings zero) and distils progressively from
  the previous phase's largest subnet;
- superclass dropout and knowledge distillation (teacher or in-place) as before.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from tailor.config import Params, PhaseConfig, SupernetConfig
from tailor.context import Context, _summary, load_supernet, save_supernet
from tailor.nets import StaticNet
from tailor.space import Arch, SearchSpace, se_channels
from tailor.supernet import SuperNet, recalibrate_bn
from tailor.train import (autocast, fit, make_optimizer, masked_cross_entropy, masked_kd, superclass_keep_mask,
                          warmup_cosine)
from tailor.utils import load_checkpoint, load_state
from tailor.utils import atomic_torch_save, atomic_write_json, file_hash, fingerprint, log


# ---------------------------------------------------------------- which paths a step trains
def phase_extreme(space: SearchSpace, ph: PhaseConfig, largest: bool) -> Arch:
    pick = max if largest else min
    return space.uniform(pick(ph.depths), pick(ph.kernels), pick(ph.expands))


def fair_paths(space: SearchSpace, ph: PhaseConfig, m: int, rng: random.Random) -> list[Arch]:
    """FairNAS strict fairness: m paths in which every slot's choices each appear m / (their count) times.

    Slots: each unit's depth, and each block position's kernel and expand. Each slot's choices are
    repeated to m entries and shuffled independently, and path p takes entry p of every slot. A
    block position beyond a path's depth is skipped in that path, so its assignment is fair but
    runs only when the depth reaches it (depth is nested here, not a per-layer skip choice).
    """
    def column(choices: list[int]) -> list[int]:
        if m % len(choices):
            raise ValueError(f"fairnas: {m} paths cannot hold each of {len(choices)} choices equally often")
        col = list(choices) * (m // len(choices))
        rng.shuffle(col)
        return col

    units = []
    for _ in range(space.n_units):
        depth = column(ph.depths)
        ks = [column(ph.kernels) for _ in range(max(ph.depths))]
        es = [column(ph.expands) for _ in range(max(ph.depths))]
        units.append([tuple((ks[j][p], es[j][p]) for j in range(depth[p])) for p in range(m)])
    return [Arch(tuple(u[p] for u in units)) for p in range(m)]


def step_paths(space: SearchSpace, ph: PhaseConfig, cfg: SupernetConfig, rng: random.Random) -> list[Arch]:
    """The architectures one training step runs, in order."""
    n = cfg.subnets_per_step
    if cfg.sampler == "fairnas":
        return fair_paths(space, ph, n, rng)
    if cfg.sampler == "spos":
        return [space.sample(rng, ph.kernels, ph.depths, ph.expands) for _ in range(n)]
    # Sandwich rule: the largest first and, with three or more per step, the smallest last; the
    # rest uniform, so that middle-sized subnets are trained too.
    paths = [phase_extreme(space, ph, True)]
    paths += [space.sample(rng, ph.kernels, ph.depths, ph.expands) for _ in range(n - 2 if n >= 3 else n - 1)]
    if n >= 3:
        paths.append(phase_extreme(space, ph, False))
    return paths


# ---------------------------------------------------------------- SuperNet2SuperNet growth
@torch.no_grad()
def grow(net: SuperNet, old: PhaseConfig, new: PhaseConfig, gen: torch.Generator) -> dict:
    """Open `new`'s choices beyond `old`'s, preserving the function of every `old` subnet.

    Everything a new choice adds is set up so that it changes nothing yet:
    - Net2Deeper: a depth slot no old subnet reached starts as an identity block (its residual
      branch's last BN has zero scale and shift);
    - Net2Wider: each channel beyond the old largest expansion is a copy of a random old channel
      (expand conv row, BN, depthwise filter, SE gate) and its outgoing weights (project conv, SE
      reduce) are split between original and copy. The split is (1, 0): with weights shared by
      channel prefix, any other split would change the narrower subnets that keep the original
      and not the copy; the copy still learns, since its activation, hence its outgoing gradient,
      is not zero. New SE hidden units are copies with zero outgoing weights;
    - a kernel ring no old subnet used starts at zero.
    Returns what was grown, for the log and the metrics.
    """
    grown = {"depth_slots": [], "expand": None, "kernel": None}
    dmax_old, dmax_new = max(old.depths), max(new.depths)
    for unit in net.units:
        for j in range(dmax_old, dmax_new):
            unit[j].project_bn.weight.zero_()
            unit[j].project_bn.bias.zero_()
    if dmax_new > dmax_old:
        grown["depth_slots"] = list(range(dmax_old, dmax_new))
    e_old, e_new = max(old.expands), max(new.expands)
    if e_new > e_old:
        grown["expand"] = [e_old, e_new]
        for unit in net.units:
            for blk in unit:
                _widen(blk, blk.mids[blk.expands.index(e_old)], blk.mids[blk.expands.index(e_new)], gen)
    k_old, k_new = max(old.kernels), max(new.kernels)
    if k_new > k_old:
        grown["kernel"] = [k_old, k_new]
        for unit in net.units:
            for blk in unit:
                w = blk.dw_conv.weight
                o = (w.shape[-1] - k_old) // 2
                inner = w[:, :, o:o + k_old, o:o + k_old].clone()
                w.zero_()
                w[:, :, o:o + k_old, o:o + k_old] = inner
    return grown


def _widen(blk, c_old: int, c_new: int, gen: torch.Generator) -> None:
    if c_new <= c_old:
        return
    src = torch.randint(0, c_old, (c_new - c_old,), generator=gen)
    new = torch.arange(c_old, c_new)
    blk.expand_conv.weight[new] = blk.expand_conv.weight[src]
    blk.dw_conv.weight[new] = blk.dw_conv.weight[src]
    for bn in (blk.expand_bn, blk.dw_bn):
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t[new] = t[src]
    blk.project_conv.weight[:, new] = 0  # the copy's share of the split
    if blk.se_on:
        h_old, h_new = se_channels(c_old), se_channels(c_new)
        blk.se_expand.weight[new] = blk.se_expand.weight[src]  # the copy gets its original's gate
        blk.se_expand.bias[new] = blk.se_expand.bias[src]
        blk.se_reduce.weight[:, new] = 0
        if h_new > h_old:
            hsrc = torch.randint(0, h_old, (h_new - h_old,), generator=gen)
            hnew = torch.arange(h_old, h_new)
            blk.se_reduce.weight[hnew] = blk.se_reduce.weight[hsrc]
            blk.se_reduce.bias[hnew] = blk.se_reduce.bias[hsrc]
            blk.se_expand.weight[:, hnew] = 0


def kd_weight_at(cfg: SupernetConfig, t: float) -> float:
    """Progressive distillation: the KD share at fraction t in [0, 1] of a grown phase."""
    c = cfg.curriculum
    return c.kd_start + (c.kd_end - c.kd_start) * min(1.0, max(0.0, t))


# ---------------------------------------------------------------- the stage
def train_supernet(p: Params, data_dir: Path, teacher_path: Path, out_path: Path, metrics_path: Path,
                   work_dir: Path) -> dict:
    """Train the supernet from the teacher's weights by the configured recipe; score min / mid / max."""
    ctx = Context(p, data_dir)
    cfg = p.supernet
    work_dir = Path(work_dir)
    torch.manual_seed(p.seed)
    # The teacher's weights initialise the supernet either way (with teacher.epochs 0 they are the
    # seeded initial weights); it runs as a KD teacher only with kd_source 'teacher'.
    teacher, _ = load_supernet(teacher_path, ctx.device)
    teacher = ctx.prepare_model(teacher).eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    model = SuperNet(ctx.space, ctx.num_classes, els=cfg.els)
    missing, unexpected = load_state(model, teacher.state_dict(), teacher_path, "teacher", strict=False)
    if unexpected or any(not k.startswith("els.") for k in missing):
        raise ValueError(f"{teacher_path}: not a teacher of this space (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    model = ctx.prepare_model(model)

    # Epoch -> phase, and a per-phase cosine schedule (each phase restarts its learning rate).
    starts, t = [], 0
    for ph in cfg.phases:
        starts.append(t)
        t += ph.epochs
    total = t

    def phase_at(epoch: int):
        i = max(j for j, s in enumerate(starts) if s <= epoch)
        return i, cfg.phases[i]

    def lr_at(tt: float) -> float:
        i, ph = phase_at(min(int(tt), total - 1))
        return warmup_cosine(ph.lr, ph.epochs, cfg.optim.warmup_epochs)(tt - starts[i])

    fp = fingerprint("supernet", p.seed, p.space.model_dump(), p.augment.model_dump(), cfg.model_dump(),
                     file_hash(Path(data_dir) / "meta.json"), file_hash(teacher_path))
    # Curriculum: the previous phase's largest subnet, BN recalibrated, teaches a grown phase. It is
    # kept in work_dir so that a run resumed inside a grown phase distils from the same network.
    prev_teacher: dict = {"phase": None, "net": None}
    growth: list[dict] = []

    def before_epoch(epoch: int) -> None:
        if not cfg.curriculum.enabled:
            return
        i, ph = phase_at(epoch)
        if i == 0:
            return
        path = work_dir / f"curriculum-teacher-{i}.pt"
        if epoch == starts[i]:  # the phase begins: snapshot the old largest, then grow
            old = cfg.phases[i - 1]
            net = model.extract(phase_extreme(ctx.space, old, True))
            recalibrate_bn(net, ctx.recal_batches(p.seed))
            atomic_torch_save({"fingerprint": fp, "arch": net.arch, "state_dict": net.state_dict()}, path)
            info = grow(model, old, ph, torch.Generator().manual_seed(int(fingerprint(p.seed, "grow", i)[:12], 16)))
            growth.append({"phase": ph.name, "epoch": epoch, **info})
            log(f"curriculum: grew the supernet into phase {ph.name!r}: {info}")
        if prev_teacher["phase"] != i:
            ck = load_checkpoint(path, "curriculum teacher")
            if ck.get("fingerprint") != fp:
                raise RuntimeError(f"{path}: the curriculum teacher of another configuration; delete {work_dir} "
                                   "to restart this run")
            net = StaticNet(ctx.space, Arch.parse(ck["arch"]), ctx.num_classes)
            load_state(net, ck["state_dict"], path, "curriculum teacher")
            prev_teacher.update(phase=i, net=ctx.prepare_model(net).eval().requires_grad_(False))

    class_sc = torch.tensor(ctx.meta.class_superclass, device=ctx.device)
    n_batches = ctx.batches("train", cfg.optim.batch_size).num_batches(drop_last=True)

    def step(m, x, y, sc, epoch, i):
        phase_i, ph = phase_at(epoch)
        rng = random.Random(fingerprint(p.seed, epoch, i))
        gen = torch.Generator().manual_seed(rng.getrandbits(62))
        t_logits = None
        if cfg.kd_source == "teacher" and cfg.kd_weight > 0:
            with torch.no_grad(), autocast(ctx.device, p.runtime):
                t_logits = teacher(x)
        prev_logits, lam = None, 0.0
        if cfg.curriculum.enabled and phase_i > 0:
            lam = kd_weight_at(cfg, (epoch - starts[phase_i] + i / n_batches) / ph.epochs)
            with torch.no_grad(), autocast(ctx.device, p.runtime):
                prev_logits = prev_teacher["net"](x)
        keep = superclass_keep_mask(sc, class_sc, cfg.superclass_dropout, gen)
        paths = step_paths(ctx.space, ph, cfg, rng)
        losses = {"ce": 0.0, "kd": 0.0}
        for k, arch in enumerate(paths):
            with autocast(ctx.device, p.runtime):
                logits = m(x, arch)
            ce = masked_cross_entropy(logits, y, keep, cfg.optim.label_smoothing)
            if prev_logits is not None:
                ce = (1 - lam) * ce + lam * masked_kd(logits, prev_logits, keep, cfg.kd_temperature)
            if cfg.kd_weight == 0:
                kd = torch.zeros((), device=logits.device)
            elif t_logits is None:  # in-place: the largest subnet (k == 0) learns from labels and teaches the rest
                kd = torch.zeros((), device=logits.device)
                t_logits = logits.detach()
            else:
                kd = masked_kd(logits, t_logits, keep, cfg.kd_temperature)
            ((ce + cfg.kd_weight * kd) / len(paths)).backward()
            losses["ce"] += ce.item() / len(paths)
            losses["kd"] += kd.item() / len(paths)
        return losses

    res = fit(model, ctx.batches("train", cfg.optim.batch_size), make_optimizer(model, cfg.optim), total, lr_at,
              step, work_dir / "checkpoint.pt", p.seed, fp, p.runtime.log_every, before_epoch=before_epoch)
    model.eval()
    evals = {name: ctx.evaluate_subnet(model, getattr(ctx.space, f"{name}_arch"), per_image=True)
             for name in ("min", "mid", "max")}
    metrics = {"epochs": total, "phases": [ph.name for ph in cfg.phases], "train_seconds": round(res.seconds, 1),
               "device": str(ctx.device), "sampler": cfg.sampler, "subnets_per_step": cfg.subnets_per_step,
               "els": cfg.els, "curriculum": cfg.curriculum.enabled, "growth": growth,
               "superclass_dropout": cfg.superclass_dropout, "history": res.history, "subnets": _summary(evals)}
    save_supernet(out_path, model, ctx, p, "train-supernet", {"metrics": metrics})
    atomic_write_json(metrics_path, metrics)
    log("train-supernet: " + ", ".join(f"{k} {v['madds_m']}M val={v['val_sc_top1_mean']}"
                                       for k, v in metrics["subnets"].items()))
    return metrics
