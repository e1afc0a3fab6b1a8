"""The Elastic Architecture Search generator G(B, t): one network that maps (budget, superclass) to
an architecture, trained once on the frozen supernet, then queried for many scenarios in one pass.

Shape of G (EAS, Algorithm 1):
    superclass embedding (dim d) ++ budget embedding (dim d; K anchors evenly spaced on
    [B_low, B_high], linear interpolation between the two nearest)          -> cond (M, 2d)
    an LSTM cell stepped once per unit of the space; step u reads cond ++ an embedding of the
    decisions sampled at step u - 1 (zeros at step 0)                        -> h_u (M, hidden)
    three linear heads on h_u: depth gates (max_depth - min_depth), kernel gates
    (max_depth x (kernels - 1)), expand gates (max_depth x (expands - 1))

Feeding back the sampled decisions (as ENAS and EAS do) is what lets one unit's choice depend on
what the units before it chose: with the same input at every step the LSTM can only emit a fixed
per-unit pattern for each (t, B), and the cost of the whole net cannot be traded between units.
`autoregressive: false` keeps the old, constant-input form for the ablation.

One LSTM step per unit rather than per block slot: a unit is where depth is decided, so all of a
unit's choices come from one state; it keeps the recurrence short (5 steps, not 20), which bounds
inference latency.

Gates are Bernoulli with p = sigmoid(z). Training samples them with the Gumbel-sigmoid relaxation
at temperature tau, hard 0/1 in the forward pass with the straight-through gradient, so the
supernet always runs a real architecture (`SuperNet.forward_gated` equals the extracted subnet
for hard gates) and the cost term R(alpha) is that architecture's exact cost.

BatchNorm: every architecture is scored (by `Evaluator`, when candidates are re-ranked, and in
the report) with BN statistics recalibrated on a fixed sample of all-class training images. The
generator's loss sees the same thing: each gated forward normalises with statistics computed on
`bn_context` images drawn from that same recalibration sample (`context_stat_bn`), never on the
superclass's validation images whose loss it takes. (`bn: batch` is the earlier scheme - batch
statistics of a batch that was half one superclass's images - kept for the ablation.)
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
from tailor.utils import load_checkpoint, log


class ArchGenerator(nn.Module):
    def __init__(self, space: SearchSpace, n_superclasses: int, low: float, high: float, embed_dim: int,
                 hidden: int, anchors: int, autoregressive: bool = True):
        super().__init__()
        c = space.cfg
        self.n_units, self.max_depth = space.n_units, space.max_depth
        self.n_depth = space.max_depth - min(c.depths)
        self.n_kernel, self.n_expand = len(c.kernels) - 1, len(c.expands) - 1
        self.low, self.high, self.anchors = float(low), float(high), anchors
        self.autoregressive, self.hidden = autoregressive, hidden
        self.n_decisions = self.n_depth + self.max_depth * (self.n_kernel + self.n_expand)
        self.superclass = nn.Embedding(n_superclasses, embed_dim)
        self.budget = nn.Embedding(anchors, embed_dim)
        self.decision = nn.Linear(self.n_decisions, embed_dim) if autoregressive else None
        self.cell = nn.LSTMCell(embed_dim * (3 if autoregressive else 2), hidden)
        self.depth_head = nn.Linear(hidden, self.n_depth)
        self.kernel_head = nn.Linear(hidden, self.max_depth * self.n_kernel)
        self.expand_head = nn.Linear(hidden, self.max_depth * self.n_expand)

    def budget_embedding(self, budget: torch.Tensor) -> torch.Tensor:
        """(M,) budgets in the cost unit -> (M, d), interpolating between the two nearest anchors."""
        pos = (budget - self.low) / (self.high - self.low) * (self.anchors - 1)
        i = pos.floor().long().clamp(0, self.anchors - 2)
        w = (pos - i).clamp(0, 1)[:, None]
        return (1 - w) * self.budget(i) + w * self.budget(i + 1)

    def forward(self, superclass: torch.Tensor, budget: torch.Tensor, decide):
        """Run the U unit steps for M scenarios; `decide(u, (zd, zk, ze)) -> (gd, gk, ge)` turns step u's
        logits into its hard gates (a sample, the mode, or given gates), which step u + 1 reads.

        Returns (logits, gates), each a triple: depth (M, U, Dd), kernel (M, U, D, nK-1),
        expand (M, U, D, nE-1).
        """
        m = superclass.shape[0]
        cond = torch.cat([self.superclass(superclass), self.budget_embedding(budget)], dim=1)  # (M, 2d)
        h = cond.new_zeros(m, self.hidden)
        c = cond.new_zeros(m, self.hidden)
        prev = cond.new_zeros(m, self.decision.out_features) if self.autoregressive else None
        logits, gates = ([], [], []), ([], [], [])
        for u in range(self.n_units):
            h, c = self.cell(torch.cat([cond, prev], 1) if self.autoregressive else cond, (h, c))
            z = (self.depth_head(h), self.kernel_head(h).view(m, self.max_depth, self.n_kernel),
                 self.expand_head(h).view(m, self.max_depth, self.n_expand))
            g = decide(u, z)
            for out, v in zip(logits, z):
                out.append(v)
            for out, v in zip(gates, g):
                out.append(v)
            if self.autoregressive:
                prev = self.decision(torch.cat([g[0], g[1].flatten(1), g[2].flatten(1)], 1))
        return tuple(torch.stack(v, 1) for v in logits), tuple(torch.stack(v, 1) for v in gates)


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


# Deciders: how one step's logits become its hard gates (see ArchGenerator.forward).
def relaxed_sampler(tau: float, gen: torch.Generator):
    return lambda u, z: tuple(gumbel_sigmoid_st(v, tau, gen) for v in z)


def mode_decider(u, z):
    return tuple((v > 0).to(v.dtype) for v in z)  # sigmoid(v) > 1/2


def bernoulli_sampler(gen: torch.Generator):
    return lambda u, z: tuple(torch.bernoulli(torch.sigmoid(v).cpu(), generator=gen).to(v) for v in z)


def forced(gates: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
    """Teacher forcing: step u takes the given gates' step u (to score a known decision sequence)."""
    return lambda u, z: tuple(g[:, u] for g in gates)


def decode(space: SearchSpace, depth: torch.Tensor, kernel: torch.Tensor, expand: torch.Tensor) -> list[Arch]:
    """Hard nested gates for M scenarios -> M architectures (vectorised `Gates.to_arch`)."""
    c = space.cfg
    d = (min(c.depths) + torch.cumprod(depth, -1).sum(-1)).long().tolist()   # (M, U)
    k = torch.cumprod(kernel, -1).sum(-1).long().tolist()                     # (M, U, D)
    e = torch.cumprod(expand, -1).sum(-1).long().tolist()
    ks, es = c.kernels, c.expands
    return [Arch(tuple(tuple((ks[k[m][i][j]], es[e[m][i][j]]) for j in range(d[m][i])) for i in range(len(d[m]))))
            for m in range(len(d))]


def _bns(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def context_stat_bn(model: nn.Module, n_context: int):
    """BatchNorm normalising every row of a batch with statistics of its first `n_context` rows only.

    The caller puts all-class training images (from the recalibration sample scoring uses) first
    and the images whose loss it takes after them, so the loss sees the statistics a recalibrated
    subnet has, not those of one superclass's images. Gradients flow through the statistics, as in
    ordinary training-mode BN; running buffers are left untouched.
    """
    def make(bn):
        def forward(x):
            ref = x[:n_context]
            mean, var = ref.mean((0, 2, 3), keepdim=True), ref.var((0, 2, 3), unbiased=False, keepdim=True)
            scale = bn.weight[None, :, None, None] * torch.rsqrt(var + bn.eps)
            return (x - mean) * scale + bn.bias[None, :, None, None]
        return forward

    bns = _bns(model)
    for bn in bns:
        bn.forward = make(bn)  # an instance attribute shadows the class's forward
    try:
        yield model
    finally:
        for bn in bns:
            del bn.forward


@contextlib.contextmanager
def batch_stat_bn(model: nn.Module):
    """BatchNorm on plain batch statistics, running buffers untouched (the `bn: batch` ablation)."""
    bns = _bns(model)
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


class _Data:
    """What G trains on: per superclass, validation rows for the gradient and held-out rows for the
    curve, plus the BN context pool (the evaluator's recalibration images)."""

    def __init__(self, setup, holdout: float, rng: torch.Generator):
        ctx = setup.ctx
        self.val = ctx.batches("val")
        self.cl = ctx.p.runtime.channels_last
        self.device = ctx.device
        sc_of = torch.as_tensor(ctx.meta.class_superclass)[self.val.y_cpu]
        keep = setup.evaluator.keep_classes  # proxy classes: G trains on what the search scores
        if keep is not None:
            sc_of = torch.where(torch.isin(self.val.y_cpu, torch.tensor(sorted(keep))), sc_of, -1)
        self.fit, self.held = {}, {}
        for t in setup.grid_scs:
            rows = torch.nonzero(sc_of == t).flatten()
            rows = rows[torch.randperm(len(rows), generator=rng)]
            n_held = max(1, int(round(holdout * len(rows)))) if holdout > 0 else 0
            if len(rows) - n_held < 1:
                raise SearchError(f"search.generator.holdout {holdout}: superclass "
                                  f"{ctx.meta.superclasses[t]} has {len(rows)} validation images, none left to train on")
            self.held[t], self.fit[t] = rows[:n_held], rows[n_held:]
        self.pool = torch.cat(setup.evaluator.recal_sample())
        if self.cl:
            self.pool = self.pool.contiguous(memory_format=torch.channels_last)
        self.classes = {t: torch.as_tensor(ctx.meta.classes_of(t), device=ctx.device) for t in setup.grid_scs}
        local = torch.full((ctx.num_classes,), -1, dtype=torch.long)
        for t, cls in self.classes.items():
            local[cls.cpu()] = torch.arange(len(cls))
        self.local = local.to(ctx.device)
        self.train = ctx.batches("train", ctx.p.runtime.bn_recal_batch_size, augment=False)

    def images(self, batches, idx: torch.Tensor) -> torch.Tensor:
        x = batches.x[idx.to(batches.x.device)].to(self.device).float()
        x = (x - batches.mean) / batches.std
        return x.contiguous(memory_format=torch.channels_last) if self.cl else x

    def labels(self, idx: torch.Tensor) -> torch.Tensor:
        return self.local[self.val.y[idx.to(self.val.y.device)].to(self.device)]


def _gated_logits(supernet, data: _Data, cfg: GeneratorConfig, gates: Gates, x: torch.Tensor,
                  rng: torch.Generator | None) -> torch.Tensor:
    """Supernet logits of `x` under `gates`, with the configured BN handling (rng None: a fixed context)."""
    if cfg.bn == "context":
        n = min(cfg.bn_context, len(data.pool))
        idx = torch.arange(n) if rng is None else torch.randperm(len(data.pool), generator=rng)[:n]
        with context_stat_bn(supernet, n):
            return supernet.forward_gated(torch.cat([data.pool[idx.to(data.pool.device)], x]), gates)[n:].float()
    extra = (torch.arange(cfg.bn_context) if rng is None
             else torch.randint(len(data.train), (cfg.bn_context,), generator=rng))
    with batch_stat_bn(supernet):
        return supernet.forward_gated(torch.cat([x, data.images(data.train, extra)]), gates)[:len(x)].float()


def budget_term(r: torch.Tensor, budget: float, low: float, high: float, norm: str) -> torch.Tensor:
    """((R - B) / scale)^2 with scale the space's cost range or the budget itself."""
    scale = (high - low) if norm == "range" else budget
    return ((r - budget) / scale) ** 2


@torch.no_grad()
def heldout_point(gen_model: "ArchGenerator", setup, data: _Data, cfg: GeneratorConfig,
                  budgets: list[float]) -> dict:
    """The mode architecture's CE and accuracy on the held-out validation rows, for every grid
    superclass at `budgets`, with the training's BN handling on a fixed context; and its cost gap."""
    scs = [t for t in setup.grid_scs for _ in budgets]
    bs = [b for _ in setup.grid_scs for b in budgets]
    dev = data.device
    _, g = gen_model(torch.tensor(scs, device=dev), torch.tensor(bs, device=dev, dtype=torch.float32), mode_decider)
    held = {t: (data.images(data.val, data.held[t]), data.labels(data.held[t])) for t in setup.grid_scs}
    ce = acc = gap = 0.0
    n_img = 0
    for m, (t, b) in enumerate(zip(scs, bs)):
        x, y = held[t]
        gates = Gates(g[0][m], g[1][m], g[2][m])
        out = _gated_logits(setup.supernet, data, cfg, gates, x, None)[:, data.classes[t]]
        ce += float(F.cross_entropy(out, y, reduction="sum"))
        acc += float((out.argmax(1) == y).sum())
        n_img += len(y)
        gap += abs(float(setup.cost.cost_of(gates)) - b) / b
    return {"heldout_ce": round(ce / n_img, 5), "heldout_acc": round(acc / n_img, 5),
            "mode_abs_gap": round(gap / len(scs), 5)}


def train_generator(setup, cfg: GeneratorConfig, seed: int, log_every: int = 0) -> tuple["ArchGenerator", dict]:
    """EAS training on the frozen supernet. Each update draws a batch of scenarios (every grid
    superclass, or `scenarios_per_step` of them, each with B ~ U(B_low, B_high)), samples one
    architecture per scenario from G, and minimises the mean over scenarios of
        CE(gated supernet on the superclass's validation images, over its classes)
        + lambda ((R(alpha) - B) / scale)^2.
    Every `eval_every` of training (and before the first step) the mode architectures' CE on the
    held-out validation rows is logged: the curve that says whether G learns accuracy at all.
    """
    ctx, supernet, cost = setup.ctx, setup.supernet, setup.cost
    low, high = cost.low_high
    rng = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    gen_model = ArchGenerator(setup.space, len(ctx.meta.superclasses), low, high, cfg.embed_dim, cfg.hidden,
                              cfg.anchors, cfg.autoregressive).to(ctx.device)
    opt = torch.optim.Adam(gen_model.parameters(), lr=cfg.lr)
    data = _Data(setup, cfg.holdout, rng)
    grid = list(setup.grid_scs)
    m_per_step = min(cfg.scenarios_per_step or len(grid), len(grid))
    # The curve's budgets: the grid's lowest, middle and highest (a handful of forwards per point).
    grid_b = sorted({s.budget for s in setup.scenarios})
    curve_budgets = sorted({grid_b[0], grid_b[len(grid_b) // 2], grid_b[-1]})
    points = sorted({max(1, round(cfg.steps * i / cfg.eval_points)) for i in range(1, cfg.eval_points + 1)})
    history, curve = [], []
    acc = {"loss": 0.0, "ce": 0.0, "budget": 0.0, "rel_gap": 0.0}
    t0 = time.perf_counter()
    every = log_every or max(1, cfg.steps // 5)
    if data.held[grid[0]].numel():
        curve.append({"step": 0, **heldout_point(gen_model.eval(), setup, data, cfg, curve_budgets), "seconds": 0.0})
    gen_model.train()
    for step in range(cfg.steps):
        pick = torch.randperm(len(grid), generator=rng)[:m_per_step].tolist()
        scs = [grid[i] for i in pick]
        budgets = (low + torch.rand(len(scs), generator=rng, dtype=torch.float64) * (high - low)).tolist()
        _, g = gen_model(torch.tensor(scs, device=ctx.device),
                         torch.tensor(budgets, device=ctx.device, dtype=torch.float32), relaxed_sampler(cfg.tau, rng))
        loss = 0.0
        for m, (t, b) in enumerate(zip(scs, budgets)):
            rows = data.fit[t]
            if len(rows) > cfg.batch_size:
                rows = rows[torch.randperm(len(rows), generator=rng)[:cfg.batch_size]]
            gates = Gates(g[0][m], g[1][m], g[2][m])
            logits = _gated_logits(supernet, data, cfg, gates, data.images(data.val, rows), rng)
            ce = F.cross_entropy(logits[:, data.classes[t]], data.labels(rows))
            r = cost.cost_of(gates)
            bt = budget_term(r, b, low, high, cfg.budget_norm)
            loss = loss + (ce + cfg.budget_weight * bt) / len(scs)
            acc["ce"] += ce.item() / len(scs)
            acc["budget"] += bt.item() / len(scs)
            acc["rel_gap"] += (r.item() - b) / b / len(scs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc["loss"] += loss.item()
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            n = (step % every) + 1
            row = {"step": step + 1, **{k_: round(v / n, 5) for k_, v in acc.items()},
                   "seconds": round(time.perf_counter() - t0, 1)}
            history.append(row)
            log("search-generator: " + " ".join(f"{k_}={v}" for k_, v in row.items()))
            acc = dict.fromkeys(acc, 0.0)
        if step + 1 in points and data.held[grid[0]].numel():
            point = heldout_point(gen_model.eval(), setup, data, cfg, curve_budgets)
            gen_model.train()
            curve.append({"step": step + 1, **point, "seconds": round(time.perf_counter() - t0, 1)})
            log(f"search-generator: held-out step {step + 1}: {point}")
    gen_model.eval()
    return gen_model, {"history": history, "heldout_curve": curve, "train_s": round(time.perf_counter() - t0, 3),
                       "scenarios_per_step": m_per_step,
                       "heldout_images": int(sum(len(v) for v in data.held.values()))}


@torch.no_grad()
def propose(gen_model: ArchGenerator, space: SearchSpace, cost: SlotCostModel, snap: Snapper | None,
            scenarios: list[Scenario], candidates: int, max_tries: int, seed: int) -> list[list[Arch]]:
    """Up to `candidates` distinct architectures per scenario, from forward passes of G over all M
    scenarios at once.

    Candidate 0 is the mode (each gate on iff p > 1/2, fed back step by step), the others Bernoulli
    samples of G's autoregressive distribution. A draw over its budget is replaced by the first of
    `max_tries - 1` redraws that fits (all redraws of a round in one batched forward pass, their
    costs from the gates without decoding them), then
    snapped into the budget window (when `snap` is given). Draws stop when every scenario has
    `candidates` distinct ones or after 10 x candidates rounds.
    """
    for s in scenarios:
        if not gen_model.low - 1e-9 * abs(gen_model.low) <= s.budget <= gen_model.high * (1 + 1e-9):
            raise SearchError(f"scenario {s.key}: budget outside the generator's range "
                              f"[{gen_model.low:.6g}, {gen_model.high:.6g}] {cost.unit}")
    rng = torch.Generator().manual_seed(seed)
    dev = next(gen_model.parameters()).device
    sc = torch.tensor([s.sc for s in scenarios], device=dev)
    budgets = torch.tensor([s.budget for s in scenarios], device=dev, dtype=torch.float32)
    limit = torch.tensor([s.budget for s in scenarios], dtype=torch.float64) * (1 + 1e-12)
    out: list[list[Arch]] = [[] for _ in scenarios]
    need = list(range(len(scenarios)))
    redraws = max_tries - 1
    for rnd in range(10 * candidates):
        if not need:
            break
        idx = torch.tensor(need, device=dev)
        _, g = gen_model(sc[idx], budgets[idx], mode_decider if rnd == 0 else bernoulli_sampler(rng))
        g = [v.cpu() for v in g]
        over = torch.nonzero(cost.cost_of([v.double() for v in g]) > limit[idx.cpu()]).flatten()
        if len(over) and redraws:
            rep = idx[over.to(dev)].repeat_interleave(redraws)
            _, g2 = gen_model(sc[rep], budgets[rep], bernoulli_sampler(rng))
            g2 = [v.cpu() for v in g2]
            fits = (cost.cost_of([v.double() for v in g2]) <= limit[rep.cpu()]).view(len(over), redraws)
            # The first redraw that fits, else the last one (snapping brings it within budget).
            pick = torch.where(fits.any(1), fits.float().argmax(1), torch.full((len(over),), redraws - 1))
            rows = torch.arange(len(over)) * redraws + pick
            for v, v2 in zip(g, g2):
                v[over] = v2[rows]
        for m, a in zip(need, decode(space, *g)):
            a = snap(a, scenarios[m].budget) if snap is not None else a
            if a not in out[m]:
                out[m].append(a)
        need = [m for m in need if len(out[m]) < candidates]
    return out


def save_generator(path, gen_model: ArchGenerator, cfg: GeneratorConfig, setup, extra: dict) -> None:
    from tailor.context import provenance
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

    ck = load_checkpoint(path, "architecture generator", ("params", "image_size", "config", "superclasses", "low",
                                                          "high", "state_dict"))
    space = SearchSpace(SpaceConfig.model_validate(ck["params"]["space"]), ck["image_size"])
    cfg = GeneratorConfig.model_validate(ck["config"])
    g = ArchGenerator(space, len(ck["superclasses"]), ck["low"], ck["high"], cfg.embed_dim, cfg.hidden, cfg.anchors,
                      cfg.autoregressive)
    g.load_state_dict(ck["state_dict"])
    return g.to(device).eval(), ck, space
