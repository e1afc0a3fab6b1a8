"""The weight-sharing supernet: elastic kernel, expand and depth; subnet extraction; BN recalibration.

Two ways to run a subnet, both on the same weights:
- `forward(x, arch)` slices weights (kernels by centre crop, channels by prefix) - fast, for
  training and evaluation of sampled architectures;
- `forward_gated(x, gates)` keeps full-size tensors and multiplies by nested binary gates, so the
  architecture generator can back-propagate into the gate probabilities (single-path encoding).
For hard 0/1 gates both give the same outputs as the extracted `StaticNet`.

With `els` (SCARLET's equivariant learnable stabilizer) a block skipped by depth is not an
identity but a learnable 1x1 convolution (no BN, no activation), initialised to the identity.
Skipped blocks trail their unit, so a unit's stabilizers compose to one linear map on its output,
which extraction folds into the next 1x1 convolution: the exported network keeps its shape.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tailor import distributed
from tailor.nets import ACTIVATIONS, Head, Stem, StaticNet
from tailor.space import Arch, SearchSpace, mid_channels, se_channels


def _bn(x, bn: nn.BatchNorm2d, c: int):
    """BatchNorm over the first c channels; slices of the running buffers are views, so updates land."""
    return distributed.batch_norm(x, bn.running_mean[:c], bn.running_var[:c], bn.weight[:c], bn.bias[:c],
                                  bn.training, bn.momentum, bn.eps)


def nested_levels(gates: torch.Tensor) -> torch.Tensor:
    """Gates (..., n-1) for n nested choices -> weight of each choice's increment (..., n).

    Level 0 always runs; level i runs when gates 1..i are all on: w_i = prod_{j<i} g_j.
    """
    ones = torch.ones_like(gates[..., :1])
    return torch.cat([ones, torch.cumprod(gates, dim=-1)], dim=-1)


def gates_for(choices: list[int], value: int, device=None) -> torch.Tensor:
    """Hard gates selecting `value` among nested `choices`."""
    i = choices.index(value)
    return torch.tensor([1.0 if j < i else 0.0 for j in range(len(choices) - 1)], device=device)


class DynamicMBConv(nn.Module):
    """An MBConv at its largest kernel and expansion, runnable at any smaller choice."""

    def __init__(self, cin: int, cout: int, stride: int, kernels: list[int], expands: list[int], se: bool, act: str):
        super().__init__()
        self.cin, self.cout, self.stride, self.se_on, self.act_name = cin, cout, stride, se, act
        self.kernels, self.expands = kernels, expands
        self.mids = [mid_channels(cin, e) for e in expands]
        kmax, mid = max(kernels), self.mids[-1]
        self.expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
        self.expand_bn = nn.BatchNorm2d(mid)
        self.dw_conv = nn.Conv2d(mid, mid, kmax, stride, kmax // 2, groups=mid, bias=False)
        self.dw_bn = nn.BatchNorm2d(mid)
        if se:
            self.se_reduce = nn.Conv2d(mid, se_channels(mid), 1)
            self.se_expand = nn.Conv2d(se_channels(mid), mid, 1)
        self.project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(cout)
        self.act = ACTIVATIONS[act]()
        self.residual = stride == 1 and cin == cout
        # Masks for gated mode: increment i covers kernel ring i / channel group i of the nested choices.
        kmasks, prev = [], torch.zeros(kmax, kmax)
        for k in kernels:
            m = torch.zeros(kmax, kmax)
            o = (kmax - k) // 2
            m[o:o + k, o:o + k] = 1
            kmasks.append(m - prev)
            prev = m
        self.register_buffer("kernel_increments", torch.stack(kmasks), persistent=False)
        self.register_buffer("channel_increments", self._increments(self.mids, mid), persistent=False)
        self.register_buffer("se_increments", self._increments([se_channels(m) for m in self.mids], se_channels(mid)),
                             persistent=False)

    @staticmethod
    def _increments(sizes: list[int], total: int) -> torch.Tensor:
        rows, prev = [], 0
        for s in sizes:
            r = torch.zeros(total)
            r[prev:s] = 1
            rows.append(r)
            prev = s
        return torch.stack(rows)

    def _kernel(self, k: int) -> torch.Tensor:
        kmax = max(self.kernels)
        o = (kmax - k) // 2
        return self.dw_conv.weight[:, :, o:o + k, o:o + k]

    def forward(self, x, kernel: int, expand: int):
        mid = self.mids[self.expands.index(expand)]
        y = self.act(_bn(F.conv2d(x, self.expand_conv.weight[:mid]), self.expand_bn, mid))
        y = F.conv2d(y, self._kernel(kernel)[:mid], None, self.stride, kernel // 2, 1, mid)
        y = self.act(_bn(y, self.dw_bn, mid))
        if self.se_on:
            h = se_channels(mid)
            s = y.mean((2, 3), keepdim=True)
            s = torch.relu(F.conv2d(s, self.se_reduce.weight[:h, :mid], self.se_reduce.bias[:h]))
            y = y * F.hardsigmoid(F.conv2d(s, self.se_expand.weight[:mid, :h], self.se_expand.bias[:mid]))
        y = _bn(F.conv2d(y, self.project_conv.weight[:, :mid]), self.project_bn, self.cout)
        return x + y if self.residual else y

    def forward_gated(self, x, kernel_gates: torch.Tensor, expand_gates: torch.Tensor):
        """kernel_gates: (len(kernels)-1,), expand_gates: (len(expands)-1,), values in [0, 1]."""
        ew = nested_levels(expand_gates)
        cmask = (ew[:, None] * self.channel_increments).sum(0)[None, :, None, None]
        kmask = (nested_levels(kernel_gates)[:, None, None] * self.kernel_increments).sum(0)
        # Re-mask after every activation: BN of an all-zero channel is not zero.
        y = self.act(self.expand_bn(self.expand_conv(x))) * cmask
        y = F.conv2d(y, self.dw_conv.weight * kmask, None, self.stride, self.dw_conv.padding, 1, self.dw_conv.groups)
        y = self.act(self.dw_bn(y)) * cmask
        if self.se_on:
            hmask = (ew[:, None] * self.se_increments).sum(0)[None, :, None, None]
            s = y.mean((2, 3), keepdim=True)
            s = torch.relu(self.se_reduce(s)) * hmask
            y = y * F.hardsigmoid(self.se_expand(s))
        y = self.project_bn(self.project_conv(y))
        return x + y if self.residual else y

    def extract(self, kernel: int, expand: int):
        from tailor.nets import MBConv

        mid = self.mids[self.expands.index(expand)]
        h = se_channels(mid)
        blk = MBConv(self.cin, self.cout, self.stride, kernel, mid, self.se_on, self.act_name)
        with torch.no_grad():
            _copy_conv_bn(blk.expand[0], blk.expand[1], self.expand_conv.weight[:mid], self.expand_bn, mid)
            _copy_conv_bn(blk.depthwise[0], blk.depthwise[1], self._kernel(kernel)[:mid], self.dw_bn, mid)
            if self.se_on:
                blk.se.reduce.weight.copy_(self.se_reduce.weight[:h, :mid])
                blk.se.reduce.bias.copy_(self.se_reduce.bias[:h])
                blk.se.expand.weight.copy_(self.se_expand.weight[:mid, :h])
                blk.se.expand.bias.copy_(self.se_expand.bias[:mid])
            _copy_conv_bn(blk.project[0], blk.project[1], self.project_conv.weight[:, :mid], self.project_bn, self.cout)
        return blk


def _copy_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, weight, src_bn: nn.BatchNorm2d, c: int):
    conv.weight.copy_(weight)
    bn.weight.copy_(src_bn.weight[:c])
    bn.bias.copy_(src_bn.bias[:c])
    bn.running_mean.copy_(src_bn.running_mean[:c])
    bn.running_var.copy_(src_bn.running_var[:c])
    bn.num_batches_tracked.copy_(src_bn.num_batches_tracked)


@dataclass
class Gates:
    """Single-path encoding of an architecture as nested binary gates.

    depth:  (units, max_depth - min_depth)  optional block j of a unit runs if gates 0..j are on
    kernel: (units, max_depth, len(kernels) - 1)
    expand: (units, max_depth, len(expands) - 1)
    """

    depth: torch.Tensor
    kernel: torch.Tensor
    expand: torch.Tensor

    @classmethod
    def from_arch(cls, space: SearchSpace, arch: Arch, device=None) -> "Gates":
        c, dmin = space.cfg, min(space.cfg.depths)
        depth = torch.stack([gates_for(list(range(dmin, space.max_depth + 1)), len(u), device) for u in arch.units])
        kernel = torch.zeros(space.n_units, space.max_depth, len(c.kernels) - 1, device=device)
        expand = torch.zeros(space.n_units, space.max_depth, len(c.expands) - 1, device=device)
        for i, j, k, e in arch.blocks():
            kernel[i, j] = gates_for(c.kernels, k, device)
            expand[i, j] = gates_for(c.expands, e, device)
        return cls(depth, kernel, expand)

    def to_arch(self, space: SearchSpace) -> Arch:
        """Decode hard gates: each nested choice is the number of leading ones."""
        c, dmin = space.cfg, min(space.cfg.depths)

        def lead(g) -> int:
            n = 0
            for v in g.tolist():
                if v < 0.5:
                    break
                n += 1
            return n

        units = []
        for i in range(space.n_units):
            d = dmin + lead(self.depth[i])
            units.append(tuple((c.kernels[lead(self.kernel[i, j])], c.expands[lead(self.expand[i, j])])
                               for j in range(d)))
        return Arch(tuple(units))


def _stabilize(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """A stabilizer: the 1x1 convolution with matrix `a` (channels x channels)."""
    return F.conv2d(x, a[:, :, None, None])


class SuperNet(nn.Module):
    def __init__(self, space: SearchSpace, num_classes: int, els: bool = False):
        super().__init__()
        c = space.cfg
        if list(c.depths) != list(range(min(c.depths), max(c.depths) + 1)):
            raise ValueError(f"space.depths must be consecutive integers for nested depth gates, got {c.depths}")
        self.space, self.num_classes = space, num_classes
        self.stem = Stem(space)
        self.units = nn.ModuleList()
        for i, (cin, cout, s, _) in enumerate(space.unit_geometry()):
            self.units.append(nn.ModuleList([
                DynamicMBConv(cin if j == 0 else cout, cout, s if j == 0 else 1, c.kernels, c.expands, c.se[i],
                              c.activations[i])
                for j in range(space.max_depth)]))
        self.head = Head(space, num_classes)
        self.els = None
        if els:
            geo = list(space.unit_geometry())
            for i in range(1, len(geo)):
                cin, cout, stride, _ = geo[i]
                if stride == 1 and cin == cout:
                    raise ValueError(f"supernet.els: unit {i}'s first block is residual (stride 1, {cin} -> {cout} "
                                     f"channels), so unit {i - 1}'s stabilizers cannot be folded into it; "
                                     "give it a stride or a new width, or turn els off")
            n_opt = space.max_depth - min(c.depths)
            # One (channels x channels) matrix per optional block slot of each unit.
            self.els = nn.ParameterList([nn.Parameter(torch.eye(w).repeat(n_opt, 1, 1)) for w in c.widths])

    def forward(self, x, arch: Arch | None = None):
        arch = arch or self.space.max_arch
        x = self.stem(x)
        dmin = min(self.space.cfg.depths)
        for i, (unit, blocks) in enumerate(zip(self.units, arch.units)):
            for blk, (k, e) in zip(unit, blocks):
                x = blk(x, k, e)
            if self.els is not None:
                for j in range(len(blocks), self.space.max_depth):
                    x = _stabilize(x, self.els[i][j - dmin])
        return self.head(x)

    def stabilizer(self, i: int, depth: int) -> torch.Tensor | None:
        """The linear map unit i's skipped blocks apply at this depth (None: none, or no ELS)."""
        if self.els is None or depth == self.space.max_depth:
            return None
        dmin, m = min(self.space.cfg.depths), None
        for j in range(depth, self.space.max_depth):
            a = self.els[i][j - dmin]
            m = a if m is None else a @ m  # later slots apply after earlier ones
        return m

    def forward_gated(self, x, gates: Gates):
        x = self.stem(x)
        dmin = min(self.space.cfg.depths)
        for i, unit in enumerate(self.units):
            on = nested_levels(gates.depth[i])  # weight of the min-depth group, then each optional block
            for j, blk in enumerate(unit):
                y = blk.forward_gated(x, gates.kernel[i, j], gates.expand[i, j])
                if j < dmin:
                    x = y
                elif self.els is None:  # optional blocks are residual: H + g F'(H) == H (1 - g) + F(H) g
                    x = x + on[j - dmin + 1] * (y - x)
                else:  # a skipped block is its stabilizer
                    s = _stabilize(x, self.els[i][j - dmin])
                    x = s + on[j - dmin + 1] * (y - s)
        return self.head(x)

    def extract(self, arch: Arch, classes: list[int] | None = None) -> StaticNet:
        """A plain StaticNet with this arch's weights; `classes` keeps only those classifier rows."""
        self.space.validate(arch)
        net = StaticNet(self.space, arch, len(classes) if classes is not None else self.num_classes)
        net.stem.load_state_dict(self.stem.state_dict())
        blocks = [self.units[i][j].extract(k, e) for i, j, k, e in arch.blocks()]
        net.blocks = nn.Sequential(*blocks)
        head_state = copy.deepcopy(self.head.state_dict())
        if self.els is not None:
            # Fold each unit's stabilizers into the 1x1 conv that next reads its output (the next
            # unit's expand conv, checked non-residual at construction, or the head's final conv).
            starts = [sum(arch.depths[:i]) for i in range(len(arch.units))]
            with torch.no_grad():
                for i, d in enumerate(arch.depths):
                    m = self.stabilizer(i, d)
                    if m is None:
                        continue
                    if i + 1 < len(arch.units):
                        conv = blocks[starts[i + 1]].expand[0]
                        conv.weight.copy_((conv.weight[:, :, 0, 0] @ m)[:, :, None, None])
                    else:
                        w = head_state["final.0.weight"]
                        head_state["final.0.weight"] = (w[:, :, 0, 0] @ m)[:, :, None, None]
        if classes is not None:
            idx = torch.as_tensor(classes)
            head_state["classifier.weight"] = head_state["classifier.weight"][idx]
            head_state["classifier.bias"] = head_state["classifier.bias"][idx]
        net.head.load_state_dict(head_state)
        net.train(self.training)
        return net.to(next(self.parameters()).device)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches) -> nn.Module:
    """Re-estimate BatchNorm statistics of a (extracted) subnet on training batches.

    Weight sharing leaves the supernet's running statistics a mixture over many subnets, so each
    subnet's own statistics are recomputed (cumulative average) before it is evaluated.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for x in batches:
        model(x)
    for m, (mom, _) in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)
    return model
