"""CTR models built from the spec: DeepFM, Wide & Deep, DCN, DCNv2, DNN.

Every model takes the pooled embedding of each slot, ``emb`` [batch, slots, dim] (sum pooling
for multi-valued and crossed slots), the wide (dim-1) weights of the same fids summed per
example, ``wide`` [batch], and the dense features ``dense`` [batch, n_dense]; it returns the
logit [batch] for unsampled traffic (training subtracts ``log(sample_rate)`` for sampled data).

* DNN:        ``mlp([emb, dense])``
* Wide&Deep:  ``wide + mlp([emb, dense])``
* DeepFM:     ``wide + FM(emb) + mlp([emb, dense])``, ``FM = 1/2 sum_k((sum_i v_ik)^2 - sum_i v_ik^2)``
* DCN:        ``x_{l+1} = x_0 (x_l . w_l) + b_l + x_l`` (vector cross) beside the MLP
* DCNv2:      ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` (matrix cross) beside the MLP
"""
from __future__ import annotations

import torch
from torch import nn

from schemas.spec_types import FeatureSpec, ModelKind


def mlp(sizes: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class CTRModel(nn.Module):
    def __init__(self, kind: ModelKind, num_slots: int, dim: int, num_dense: int, hidden: tuple[int, ...],
                 dropout: float = 0.0, cross_layers: int = 3):
        super().__init__()
        self.kind = kind
        width = num_slots * dim + num_dense
        self.deep = mlp([width, *hidden], dropout)
        deep_out = hidden[-1] if hidden else width
        self.bias = nn.Parameter(torch.zeros(1))
        if kind in (ModelKind.DCN, ModelKind.DCNV2):
            if kind is ModelKind.DCN:
                self.cross_weights = nn.Parameter(torch.randn(cross_layers, width) * 0.01)
            else:
                self.cross_matrices = nn.ModuleList(nn.Linear(width, width) for _ in range(cross_layers))
            self.cross_bias = nn.Parameter(torch.zeros(cross_layers, width))
            self.head = nn.Linear(deep_out + width, 1)
        else:
            self.head = nn.Linear(deep_out, 1)

    @classmethod
    def from_spec(cls, spec: FeatureSpec) -> "CTRModel":
        dims = {s.dim for s in spec.slots}
        if len(dims) != 1:
            raise ValueError(f"models take one embedding dim for all slots, got {sorted(dims)}")
        m = spec.model
        return cls(m.kind, len(spec.slots), dims.pop(), len(spec.dense), m.hidden_units, m.dropout, m.cross_layers)

    def _cross(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in range(self.cross_bias.shape[0]):
            if self.kind is ModelKind.DCN:
                x = x0 * (x @ self.cross_weights[layer]).unsqueeze(1) + self.cross_bias[layer] + x
            else:
                x = x0 * self.cross_matrices[layer](x) + x
        return x

    def forward(self, emb: torch.Tensor, wide: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([emb.flatten(1), dense], dim=1)
        deep = self.deep(x0)
        if self.kind in (ModelKind.DCN, ModelKind.DCNV2):
            deep = torch.cat([deep, self._cross(x0)], dim=1)
        logit = self.head(deep).squeeze(1) + self.bias
        if self.kind in (ModelKind.WIDE_DEEP, ModelKind.DEEPFM):
            logit = logit + wide
        if self.kind is ModelKind.DEEPFM:
            summed = emb.sum(dim=1)
            logit = logit + 0.5 * (summed * summed - (emb * emb).sum(dim=1)).sum(dim=1)
        return logit
