"""FedAvg as a running example-weighted sum: memory is one model, whatever the number
of institutions (McMahan et al. 2017)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from fedcollab.aggregation._central_dp import add_gaussian_noise_, noise_generator
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import TensorPiece, all_finite, spec_numel, torch_dtype


class AggregateOverflow(ArithmeticError):
    """Folding an update made the running sum non-finite (its values times its weight
    overflowed): the update is the cause, and the sum must be rebuilt without it."""

    def __init__(self, *, tensor: str, weight: float) -> None:
        super().__init__(f"adding the update (weight {weight:.6g}) made the sum of tensor {tensor!r} non-finite")
        self.tensor = tensor


class StreamingFedAvg:
    """Accumulates sum_i(n_i * delta_i) tensor piece by tensor piece.

    Updates are deltas from the round's base model, so the new model is
    base + sum_i(n_i * delta_i) / sum_i(n_i). The weight an update is folded with and
    the one it counts with may differ: DP-FedAvg folds each update scaled by its clip
    factor and counts it once. Sums are kept in float32 (float64 for
    float64 tensors): one model's worth of memory. Not thread-safe: the coordinator's
    RoundSum serializes every call.
    """

    def __init__(self, *, manifest: tensor_pb2.ModelManifest) -> None:
        self._specs = list(manifest.tensors)
        self._sums = [
            torch.zeros(
                spec_numel(s),
                dtype=torch.float64 if torch_dtype(s.dtype) == torch.float64 else torch.float32,
            )
            for s in self._specs
        ]
        self.total_weight = 0.0
        self.num_updates = 0

    def fold(self, *, pieces: Iterable[TensorPiece], weight: float) -> None:
        """Adds weight * pieces (any part of an update, in any order). AggregateOverflow
        if a piece makes its slice of the sum non-finite: finite values with a large
        weight overflow float32. The sum is spoiled then; the caller rebuilds it without
        the update (coordinator/_round_sum.py). The check reads only the slice just
        touched, once: about what the fold itself costs."""
        for p in pieces:
            acc = self._sums[p.index][p.start : p.start + len(p.values)]
            acc.add_(p.values.to(acc.dtype), alpha=weight)
            if not all_finite(acc):
                raise AggregateOverflow(tensor=self._specs[p.index].name, weight=weight)

    def count(self, *, weight: float) -> None:
        """Counts one whole update of this weight, once all of it was folded."""
        self.total_weight += weight
        self.num_updates += 1

    def apply(
        self, base: Mapping[str, torch.Tensor], *, noise_std: float = 0.0, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """base + weighted mean of the deltas (+ N(0, noise_std^2) per coordinate), in
        each tensor's own dtype.

        The sums become the new model in place, so a commit holds the base and one
        model more, not three; the noise is drawn into a bounded buffer, tensor by
        tensor (every tensor of the manifest is floating point: the wire has no other
        dtypes). Without a generator, one with a fresh secret seed is used. The
        aggregator is spent afterwards.
        """
        out = {}
        for spec, acc in zip(self._specs, self.mean_deltas(noise_std=noise_std, generator=generator).values(),
                             strict=True):
            b = base[spec.name]
            acc.add_(b.reshape(-1).to(acc.dtype))
            out[spec.name] = acc.reshape(b.shape).to(b.dtype)  # no copy when dtypes match
        return out

    def mean_deltas(self, *, noise_std: float = 0.0,
                    generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The weighted mean of the deltas (+ noise), flat per tensor, computed in place
        in the sums: adding the base is left to the caller, who may stream it from disk.
        The aggregator is spent afterwards."""
        if self.num_updates == 0 or self.total_weight <= 0:
            raise ValueError("no update was aggregated")
        if noise_std < 0 or not math.isfinite(noise_std):
            raise ValueError(f"noise_std must be finite and non-negative, got {noise_std}")
        if noise_std > 0 and generator is None:
            generator = noise_generator()
        out = {}
        for spec, acc in zip(self._specs, self._sums, strict=True):
            acc.div_(self.total_weight)
            if noise_std > 0:
                assert generator is not None
                add_gaussian_noise_(acc, std=noise_std, generator=generator)
            out[spec.name] = acc
        self._sums = []
        return out
