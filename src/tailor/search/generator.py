"""The Elastic Architecture Search generator G(B, t): one network that maps (budget, superclass) to
an architecture, trained once on the frozen supernet, then queried for many scenarios in one pass.

Shape of G:
    superclass embedding (dim d) ++ budget embedding (dim d; K anchors evenly spaced on
    [B_low, B_high], linear interpolation between the two nearest)          -> (M, 2d)
    the same vector fed to an LSTM at each of the space's units              -> (M, units, hidden)
    three linear heads per unit step: depth gates (max_depth - min_depth), kernel gates
    (max_depth x (kernels - 1)), expand gates (max_depth x (expands - 1))

One LSTM step per unit rather than per block slot: a unit is where depth is decided (its gates
say how many of its blocks run), so all of a unit's choices come from one state; it keeps the
recurrence short (5 steps, not 20), which is what bounds inference latency, and the blocks a
step decides share their geometry (same width, resolution after the first).

Gates are Bernoulli with p = sigmoid(z). Training samples them with the Gumbel-sigmoid relaxation
at temperature tau, hard 0/1 in the forward pass with the straight-through gradient, so the
supernet always runs a real architecture (`SuperNet.forward_gated` equals the extracted subnet
for hard gates) and the cost term R(alpha) is that architecture's exact cost.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch import nn

from tailor.config import GeneratorConfig
from tailor.cost import SlotCostModel
from tailor.search.common import Scenario, SearchError, Snapper
from tailor.space import Arch, SearchSpace
from tailor.supernet import Gates
from tailor.utils import log


class ArchGenerator(nn.Module):
    def __init__(self, space: SearchSpace, n_superclasses: int, low: float, high: float, embed_dim: int,
                 hidden: int, anchors: int):
        super().__init__()
        c = space.cfg
        self.n_units, self.max_depth = space.n_units, space.max_depth
        self.n_depth = space.max_depth - min(c.depths)
        self.n_kernel, self.n_expand = len(c.kernels) - 1, len(c.expands) - 1
        self.low, self.high, self.anchors = float(low), float(high), anchors
        self.superclass = nn.Embedding(n_superclasses, embed_dim)
        self.budget = nn.Embedding(anchors, embed_dim)
        self.lstm = nn.LSTM(2 * embed_dim, hidden, batch_first=True)
        self.depth_head = nn.Linear(hidden, self.n_depth)
        self.kernel_head = nn.Linear(hidden, self.max_depth * self.n_kernel)
        self.expand_head = nn.Linear(hidden, self.max_depth * self.n_expand)

    def budget_embedding(self, budget: torch.Tensor) -> torch.Tensor:
        """(M,) budgets in the cost unit -> (M, d), interpolating between the two nearest anchors."""
        pos = (budget - self.low) / (self.high - self.low) * (self.anchors - 1)
        i = pos.floor().long().clamp(0, self.anchors - 2)
        w = (pos - i).clamp(0, 1)[:, None]
        return (1 - w) * self.budget(i) + w * self.budget(i + 1)

    def forward(self, superclass: torch.Tensor, budget: torch.Tensor):
        """Gate logits for M scenarios: depth (M, U, Dd), kernel (M, U, D, nK-1), expand (M, U, D, nE-1)."""
        m = superclass.shape[0]
        cond = torch.cat([self.superclass(superclass), self.budget_embedding(budget)], dim=1)  # (M, 2d)
        h, _ = self.lstm(cond[:, None, :].expand(m, self.n_units, cond.shape[1]))  # (M, U, hidden)
        return (self.depth_head(h),
                self.kernel_head(h).view(m, self.n_units, self.max_depth, self.n_kernel),
                self.expand_head(h).view(m, self.n_units, self.max_depth, self.n_expand))


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard value, bit-exact (the `hard + soft - soft.detach()` idiom rounds to 1 - 2^-24);
    backward: the gradient goes to the soft value unchanged."""

    @staticmethod
    def forward(ctx, hard, soft):
        return hard

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def gumbel_sigmoid_st(logits: torch.Tensor, tau: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Hard Bernoulli(sigmoid(logits)) samples whose gradient is that of the relaxed sample.

    Logistic noise log u - log(1 - u) is the difference of two Gumbels, so thresholding the relaxed
    value at 1/2 draws exactly Bernoulli(sigmoid(z)); the straight-through estimator routes the
    gradient through the relaxation at temperature tau.
    """
    u = torch.rand(logits.shape, generator=gen).to(logits.device).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return _StraightThrough.apply(hard, soft)


def decode(space: SearchSpace, depth: torch.Tensor, kernel: torch.Tensor, expand: torch.Tensor) -> list[Arch]:
    """Hard nested gates for M scenarios -> M architectures (vectorised `Gates.to_arch`)."""
    c = space.cfg
    d = (min(c.depths) + torch.cumprod(depth, -1).sum(-1)).long().tolist()   # (M, U)
    k = torch.cumprod(kernel, -1).sum(-1).long().tolist()                     # (M, U, D)
    e = torch.cumprod(expand, -1).sum(-1).long().tolist()
    ks, es = c.kernels, c.expands
    return [Arch(tuple(tuple((ks[k[m][i][j]], es[e[m][i][j]]) for j in range(d[m][i])) for i in range(len(d[m]))))
            for m in range(len(d))]


@contextlib.contextmanager
def batch_stat_bn(model: nn.Module):
    """BatchNorm on batch statistics without touching the frozen model's running buffers.

    Why batch statistics: the supernet's running statistics are a mixture over the many subnets it
    was trained with, which is why every subnet is BN-recalibrated before it is scored; normalising
    each gated forward with the batch's own statistics is the per-architecture recalibration the
    generator's loss should see. Momentum 0 leaves running_mean / running_var unchanged, and the
    step counters are restored. Dropout stays off (the model is in eval mode otherwise).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.training, m.num_batches_tracked.clone()) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.momentum = 0.0
        m.train()
    try:
        yield model
    finally:
        for m, (mom, training, nbt) in zip(bns, saved):
            m.momentum = mom
            m.train(training)
            m.num_batches_tracked.copy_(nbt)
        model.train(was_training)


def _images(batches, idx: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Normalised float images of a split's rows `idx` (no augmentation)."""
    x = batches.x[idx.to(batches.x.device)].to(batches.device).float()
    x = (x - batches.mean) / batches.std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def train_generator(setup, cfg: GeneratorConfig, seed: int, log_every: int = 0) -> tuple[ArchGenerator, dict]:
    """EAS training: per step a superclass t, a batch of t's validation images and B ~ U(B_low, B_high);
    loss = CE of the gated supernet over t's classes + lambda ((R - B) / (B_high - B_low))^2; Adam on G only.
    """
    ctx, supernet, cost = setup.ctx, setup.supernet, setup.cost
    low, high = cost.low_high
    n_sc = len(ctx.meta.superclasses)
    torch.manual_seed(seed)
    gen_model = ArchGenerator(setup.space, n_sc, low, high, cfg.embed_dim, cfg.hidden, cfg.anchors).to(ctx.device)
    opt = torch.optim.Adam(gen_model.parameters(), lr=cfg.lr)
    rng = torch.Generator().manual_seed(seed)
    # The training split at the recalibration batch size: the Batches the evaluator already holds.
    val, train = ctx.batches("val"), ctx.batches("train", ctx.p.runtime.bn_recal_batch_size)
    cl = ctx.p.runtime.channels_last
    val_sc = torch.as_tensor(ctx.meta.class_superclass)[val.y_cpu]
    val_rows = [torch.nonzero(val_sc == t).flatten() for t in range(n_sc)]
    classes = [torch.as_tensor(ctx.meta.classes_of(t), device=ctx.device) for t in range(n_sc)]
    local = torch.full((ctx.num_classes,), -1, dtype=torch.long)
    for t in range(n_sc):
        local[classes[t].cpu()] = torch.arange(len(classes[t]))
    local = local.to(ctx.device)
    history, acc = [], {"loss": 0.0, "ce": 0.0, "budget": 0.0, "rel_gap": 0.0}
    t0 = time.perf_counter()
    every = log_every or max(1, cfg.steps // 5)
    gen_model.train()
    with batch_stat_bn(supernet):
        for step in range(cfg.steps):
            t = int(torch.randint(n_sc, (1,), generator=rng))
            budget = low + float(torch.rand(1, generator=rng, dtype=torch.float64)) * (high - low)
            rows = val_rows[t]
            if len(rows) > cfg.batch_size:
                rows = rows[torch.randperm(len(rows), generator=rng)[:cfg.batch_size]]
            x, y = _images(val, rows, cl), val.y[rows.to(val.y.device)].to(ctx.device)
            if cfg.bn_context:
                extra = torch.randint(len(train), (cfg.bn_context,), generator=rng)
                x = torch.cat([x, _images(train, extra, cl)])
            d, k, e = gen_model(torch.tensor([t], device=ctx.device),
                                torch.tensor([budget], device=ctx.device, dtype=torch.float32))
            gates = Gates(*(gumbel_sigmoid_st(z[0], cfg.tau, rng) for z in (d, k, e)))
            logits = supernet.forward_gated(x, gates)[:len(y)].float()
            ce = F.cross_entropy(logits[:, classes[t]], local[y])
            r = cost.cost_gates(gates.depth, gates.kernel, gates.expand)
            budget_term = ((r - budget) / (high - low)) ** 2
            loss = ce + cfg.budget_weight * budget_term
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for name, v in (("loss", loss.item()), ("ce", ce.item()), ("budget", budget_term.item()),
                            ("rel_gap", (r.item() - budget) / budget)):
                acc[name] += v
            if (step + 1) % every == 0 or step + 1 == cfg.steps:
                n = (step % every) + 1
                row = {"step": step + 1, **{k_: round(v / n, 5) for k_, v in acc.items()},
                       "seconds": round(time.perf_counter() - t0, 1)}
                history.append(row)
                log("search-generator: " + " ".join(f"{k_}={v}" for k_, v in row.items()))
                acc = dict.fromkeys(acc, 0.0)
    gen_model.eval()
    return gen_model, {"history": history, "train_s": round(time.perf_counter() - t0, 3)}


@torch.no_grad()
def propose(gen_model: ArchGenerator, space: SearchSpace, cost: SlotCostModel, snap: Snapper | None,
            scenarios: list[Scenario], candidates: int, max_tries: int, seed: int) -> list[list[Arch]]:
    """Candidate architectures for all M scenarios from one forward pass of G.

    Candidate 0 is the mode (each gate on iff p > 1/2), the others Bernoulli samples; a candidate
    over its budget is redrawn (at most `max_tries` draws), then every candidate is snapped into
    the budget window (when `snap` is given). Returns, per scenario, its distinct candidates.
    """
    for s in scenarios:
        if not gen_model.low - 1e-9 * abs(gen_model.low) <= s.budget <= gen_model.high * (1 + 1e-9):
            raise SearchError(f"scenario {s.key}: budget outside the generator's range "
                              f"[{gen_model.low:.6g}, {gen_model.high:.6g}] {cost.unit}")
    rng = torch.Generator().manual_seed(seed)
    dev = next(gen_model.parameters()).device
    sc = torch.tensor([s.sc for s in scenarios], device=dev)
    budgets = [s.budget for s in scenarios]
    probs = [torch.sigmoid(z).cpu() for z in gen_model(sc, torch.tensor(budgets, device=dev, dtype=torch.float32))]
    out: list[list[Arch]] = [[] for _ in scenarios]
    for c in range(candidates):
        archs = decode(space, *[(p > 0.5).float() if c == 0 else torch.bernoulli(p, generator=rng) for p in probs])
        todo = [m for m, a in enumerate(archs) if cost.cost(a) > budgets[m]]
        for _ in range(max_tries - (c == 0)):
            if not todo:
                break
            redrawn = decode(space, *[torch.bernoulli(p[todo], generator=rng) for p in probs])
            for m, a in zip(todo, redrawn):
                archs[m] = a
            todo = [m for m in todo if cost.cost(archs[m]) > budgets[m]]
        for m, a in enumerate(archs):
            a = snap(a, budgets[m]) if snap is not None else a
            if a not in out[m]:
                out[m].append(a)
    return out


def save_generator(path, gen_model: ArchGenerator, cfg: GeneratorConfig, setup, extra: dict) -> None:
    from tailor.stages import provenance
    from tailor.utils import atomic_torch_save

    atomic_torch_save({"state_dict": {k: v.cpu() for k, v in gen_model.state_dict().items()},
                       "config": cfg.model_dump(mode="json"), "superclasses": list(setup.ctx.meta.superclasses),
                       "num_classes": setup.ctx.num_classes,
                       "low": gen_model.low, "high": gen_model.high, "cost_unit": setup.cost.unit,
                       "cost": setup.p.search.cost.model_dump(mode="json"), "image_size": setup.space.image_size,
                       **provenance(setup.p, "search-generator"), **extra}, path)


def load_generator(path, device="cpu") -> tuple[ArchGenerator, dict, SearchSpace]:
    """A trained generator, the checkpoint, and the search space it generates for."""
    from tailor.config import SpaceConfig

    ck = torch.load(path, map_location="cpu", weights_only=False)
    space = SearchSpace(SpaceConfig.model_validate(ck["params"]["space"]), ck["image_size"])
    cfg = GeneratorConfig.model_validate(ck["config"])
    g = ArchGenerator(space, len(ck["superclasses"]), ck["low"], ck["high"], cfg.embed_dim, cfg.hidden, cfg.anchors)
    g.load_state_dict(ck["state_dict"])
    return g.to(device).eval(), ck, space
