"""Cost models: what a budget is measured in (MAdds, or milliseconds on a named target).

Every block slot (unit i, block j) of the space has a fixed context - input resolution, in/out
channels, stride, activation, SE - so the cost of an architecture is a fixed part plus, for each
running block, an entry of a per-slot table over (kernel, expand). Both the analytic MAdds and a
profiled latency LUT take that form, which gives the search two things from one object:
`cost(arch)` (a few microseconds, called thousands of times by evolution) and
`cost_gates(gates)` (a differentiable relaxation for the architecture generator's budget loss,
exact for hard 0/1 gates).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tailor.space import Arch, SearchSpace, block_madds


@dataclass
class SlotCostModel:
    unit: str                 # "MAdds" or "ms" - what budgets are given in
    fixed: float              # stem, first block, head, classifier
    table: torch.Tensor       # (units, max_depth, len(kernels), len(expands))
    kernels: list[int]
    expands: list[int]
    min_depth: int
    scale: float = 1.0        # calibration: cost = scale * (fixed + sum of blocks) + offset
    offset: float = 0.0

    def __post_init__(self):
        self._k = {k: i for i, k in enumerate(self.kernels)}
        self._e = {e: i for i, e in enumerate(self.expands)}
        self._rows = self.table.tolist()  # python floats: lookups without tensor overhead

    def cost(self, arch: Arch) -> float:
        total = self.fixed
        for i, unit in enumerate(arch.units):
            row = self._rows[i]
            for j, (k, e) in enumerate(unit):
                total += row[j][self._k[k]][self._e[e]]
        return self.scale * total + self.offset

    def cost_of(self, gates) -> torch.Tensor:
        """cost_gates of a supernet.Gates (or a (depth, kernel, expand) sequence): the one place a
        generator's gates meet the table, so their order cannot be mixed up at a call site."""
        depth, kernel, expand = (gates.depth, gates.kernel, gates.expand) if hasattr(gates, "depth") else gates
        return self.cost_gates(depth, kernel, expand)

    def cost_gates(self, depth: torch.Tensor, kernel: torch.Tensor, expand: torch.Tensor) -> torch.Tensor:
        """Differentiable cost of (relaxed) nested gates, shapes as in supernet.Gates, optionally with
        leading batch dimensions (M architectures at once -> (M,) costs).

        A nested choice with level weights w (w_0 = 1, w_l = prod of the first l gates) picks
        level l with weight w_l - w_{l+1}; a block's cost is its run weight times the expected
        table entry under the kernel and expand level distributions.
        """
        from tailor.supernet import nested_levels

        table = self.table.to(kernel.device, kernel.dtype)
        pk = _level_probs(nested_levels(kernel))  # (..., U, D, nK)
        pe = _level_probs(nested_levels(expand))  # (..., U, D, nE)
        per_block = torch.einsum("...udk,...ude,udke->...ud", pk, pe, table)
        on_optional = nested_levels(depth)[..., 1:]  # (..., U, D - min_depth)
        run = torch.cat([torch.ones_like(per_block[..., :self.min_depth]), on_optional], dim=-1)
        return self.scale * (self.fixed + (run * per_block).sum((-2, -1))) + self.offset

    @property
    def low_high(self) -> tuple[float, float]:
        """Cost of the cheapest and the dearest architecture the table allows."""
        t = self.table
        mins = t.amin(dim=(2, 3))
        maxs = t.amax(dim=(2, 3))
        low = self.fixed + float(mins[:, :self.min_depth].sum())
        high = self.fixed + float(maxs.sum())
        return self.scale * low + self.offset, self.scale * high + self.offset


def _level_probs(w: torch.Tensor) -> torch.Tensor:
    nxt = torch.cat([w[..., 1:], torch.zeros_like(w[..., :1])], dim=-1)
    return w - nxt


def madds_cost_model(space: SearchSpace, num_classes: int) -> SlotCostModel:
    """Analytic MAdds (equal to the hook count) in the slot-table form."""
    c = space.cfg
    geo = list(space.unit_geometry())
    table = torch.zeros(space.n_units, space.max_depth, len(c.kernels), len(c.expands), dtype=torch.float64)
    from tailor.space import conv_out

    for i, (cin, cout, s, res) in enumerate(geo):
        for j in range(space.max_depth):
            bcin, bs, bres = (cin, s, res) if j == 0 else (cout, 1, conv_out(res, s))
            for a, k in enumerate(c.kernels):
                for b, e in enumerate(c.expands):
                    table[i, j, a, b] = block_madds(bcin, cout, bs, bres, k, e, c.se[i])
    return SlotCostModel("MAdds", float(space.fixed_madds(num_classes)), table, list(c.kernels), list(c.expands),
                         min(c.depths))
