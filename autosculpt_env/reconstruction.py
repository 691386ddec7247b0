"""Layer-wise reconstruction: refit a pruned layer's kept weights to the dense layer's output.

For a prunable layer with weight ``W`` (one row per output channel: a filter flattened over
its input channels and kernel positions) and calibration inputs unfolded into patches
``X`` (one row per output position), the dense output is ``X W^T``. Pruning keeps, for
output channel ``o``, the weight entries ``S_o``. Instead of zeroing the rest, the
*reconstruction* chooses the kept entries that reproduce the dense output best in least
squares (the OBC / SparseGPT / ThiNet family)::

    w_o[S] = argmin_w || X[:, S] w - X W_o ||^2 = (G_SS + damping)^-1 G_S: W_o,   G = X^T X

Only the Gram matrix ``G`` of each layer's inputs is needed. It is computed once from the
**dense** network's activations on ``calibration_samples`` training images, so a refit
depends only on the layer's own action (and, below, its producer's), never on the rest of
the policy: it is computed once per (layer, action) and cached in memory, and an
evaluation stays one forward pass. The pattern catalogs share a keep-set across many
filters (the ``autosculpt`` catalog has six row/column patterns), so a layer-action needs
one small solve per distinct keep-set, not per filter.

**Removed channels** leave nothing to refit in their own layer; they are compensated in
their *consumers* (:meth:`~autosculpt_env.graph.NetGraph.consumers`: the layers that read
the channel through zero-preserving, channel-preserving operators, so the channel reaches
them as exact zeros). The consumer's kept entries on the live input channels are refitted
to the consumer's dense output, so its refit depends on its own action and its producer's:
cached per (layer, action, producer action). A removed channel that reaches its readers
through an add, concat or matmul (residual branches, attention) is not compensated: other
branches keep the channel alive, so no weight sees it as zero only. Batch norms are
recalibrated after the refit, as in plain evaluation.

Conventions: ``damping`` is relative (SparseGPT's ``percdamp``): ``damping * mean(diag
G_SS)`` is added to the diagonal; a row whose damped refit reproduces the dense output
worse than plain masking (possible only through the damping) keeps its masked weights, so
a refit never increases a layer's output error on the calibration data. A keep-set equal to the whole row keeps the dense
weights exactly. Layers other than ``Conv2d`` with zero padding and ``Linear`` keep their
masked weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .problem import PruningProblem

CHUNK = 64  # calibration images per forward pass while accumulating Gram matrices


def _refittable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.padding_mode == "zeros"


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Inputs unfolded as ``(groups, rows, entries per filter)``, float64."""
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, x.shape[-1]).double()
    g = module.groups
    cols = F.unfold(
        x,
        module.kernel_size,
        dilation=module.dilation,
        padding=module.padding,
        stride=module.stride,
    )  # (N, C*kh*kw, L), channel-major like weight.flatten(1)
    n, k, L = cols.shape
    return cols.view(n, g, k // g, L).permute(1, 0, 3, 2).reshape(g, n * L, k // g).double()


class Reconstruction:
    """Refitted weights of every (layer, action[, producer action]) of a problem.

    Args:
        problem: the :class:`~autosculpt_env.problem.PruningProblem`.
        calibration_images: training images whose dense activations define the refit.
        damping: relative ridge term on the diagonal of each solve.
    """

    def __init__(
        self, problem: PruningProblem, calibration_images: torch.Tensor, damping: float = 0.01
    ):
        self.problem = problem
        self.damping = float(damping)
        self.gram: list[torch.Tensor | None] = self._grams(calibration_images)
        index = {layer.name: i for i, layer in enumerate(problem.layers)}
        # consumer index -> producer index, where the producer's channels are the consumer's
        # input channels one to one (the cost model's dead-channel pairs)
        self.producer: dict[int, int] = {}
        for i, layer in enumerate(problem.layers):
            for consumer in problem.graph.consumers(layer.name):
                m = index.get(consumer)
                if m is not None and self.gram[m] is not None:
                    if layer.weight.shape[0] == _in_channels(problem.layers[m].module):
                        self.producer[m] = i
        self._cache: dict[tuple[int, int, int | None], torch.Tensor] = {}

    @torch.no_grad()
    def _grams(self, images: torch.Tensor) -> list[torch.Tensor | None]:
        p = self.problem
        modules = [layer.module for layer in p.layers]
        grams: list[torch.Tensor | None] = [None] * len(modules)
        hooks = []
        for i, mod in enumerate(modules):
            if not _refittable(mod):
                continue

            def hook(module, inputs, output, i=i):
                cols = _patches(module, inputs[0])
                g = cols.transpose(1, 2) @ cols
                grams[i] = g if grams[i] is None else grams[i] + g

            hooks.append(mod.register_forward_hook(hook))
        was_training = p.model.training
        p.model.eval()
        try:
            for s in range(0, len(images), CHUNK):
                p.model(images[s : s + CHUNK])
        finally:
            for h in hooks:
                h.remove()
            p.model.train(was_training)
        return grams

    def weight(self, layer: int, action: int, producer_action: int | None = None) -> torch.Tensor:
        """The refitted weight of ``layer`` under ``action`` (zero wherever the action's mask
        is); ``producer_action`` is the action of :attr:`producer` ``[layer]``, if any."""
        if layer not in self.producer:
            producer_action = None
        key = (layer, int(action), None if producer_action is None else int(producer_action))
        if key not in self._cache:
            self._cache[key] = self._refit(*key)
        return self._cache[key]

    def _refit(self, layer: int, action: int, producer_action: int | None) -> torch.Tensor:
        p = self.problem
        info = p.layers[layer]
        mask = p.mask(layer, action)
        dense_w = info.weight
        gram = self.gram[layer]
        if gram is None:
            return dense_w * mask
        out_ch = dense_w.shape[0]
        groups, k = gram.shape[0], gram.shape[1]
        keep = mask.reshape(out_ch, k).clone()
        if producer_action is not None:
            dead = ~p.mask(self.producer[layer], producer_action).flatten(1).any(dim=1)
            if dead.any():
                per_group = dead.numel() // groups
                kk = k // per_group
                dead_cols = dead.view(groups, per_group).repeat_interleave(kk, dim=1)  # (g, k)
                keep &= ~dead_cols.repeat_interleave(out_ch // groups, dim=0)
        w = dense_w.reshape(out_ch, k).double()
        new = torch.zeros_like(w)
        rows_per_group = out_ch // groups
        for g in range(groups):
            rows = slice(g * rows_per_group, (g + 1) * rows_per_group)
            sets, inverse = torch.unique(keep[rows], dim=0, return_inverse=True)
            G = gram[g]
            for j, s in enumerate(sets):
                r = torch.nonzero(inverse == j).flatten() + g * rows_per_group
                if not s.any():
                    continue
                if s.all():
                    new[r] = w[r]
                    continue
                idx = torch.nonzero(s).flatten()
                gss = G[idx][:, idx]
                ridge = self.damping * gss.diagonal().mean().clamp_min(1e-12)
                gss = gss + ridge * torch.eye(len(idx), dtype=gss.dtype)
                rhs = G[idx] @ w[r].T  # (|S|, rows)
                fit = torch.zeros_like(w[r])
                fit[:, idx] = torch.linalg.solve(gss, rhs).T
                # the ridge term can leave a row marginally worse than plain masking: keep
                # whichever of the two reproduces the dense output better
                plain = w[r] * s
                worse = _row_error(fit - w[r], G) > _row_error(plain - w[r], G)
                new[r] = torch.where(worse.unsqueeze(1), plain, fit)
        return new.reshape(dense_w.shape).to(dense_w.dtype)

    def output_error(
        self, layer: int, weight: torch.Tensor, reference: torch.Tensor | None = None
    ) -> float:
        """Squared error ``||X (w - W)^T||^2`` summed over the calibration data, where ``W`` is
        the dense weight (or ``reference``): how far ``weight`` moves the layer's output."""
        info = self.problem.layers[layer]
        gram = self.gram[layer]
        groups, k = gram.shape[0], gram.shape[1]
        ref = info.weight if reference is None else reference
        diff = (weight.double() - ref.double()).reshape(groups, -1, k)  # (g, rows, k)
        return float(torch.einsum("gri,gij,grj->", diff, gram, diff))


def _row_error(diff: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``diff_r^T G diff_r`` per row: each row's squared output error on the calibration data."""
    return ((diff @ gram) * diff).sum(dim=1)


def _in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels
