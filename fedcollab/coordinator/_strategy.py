"""The study's strategy at commit time, within the memory of one model.

Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) step tensor by tensor: the
base tensor is read from the base model's file, the optimizer's state for it from the
state file of the base version, and the new state is written to the new version's file
as it is computed. Robust rules read the round's kept updates back from their spools as
dense coordinate blocks, a few passes at most.

Optimizer state files live in `optimizer/v{version}.safetensors` next to the models and
are written (atomically) before the round is recorded, so a crash leaves either no
commit and an orphan state file, removed at start-up, or both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedcollab._fileio import fsync_dir
from fedcollab.config import StrategyConfig
from fedcollab.coordinator._checkpoints import StreamingWriter, read_tensor, stored_tensors
from fedcollab.coordinator._round_sum import KeptUpdate
from fedcollab.errors import ConfigError
from fedcollab.v1 import tensor_pb2
from fedcollab.wire import TensorPiece, spec_numel

if TYPE_CHECKING:
    from fedcollab.aggregation import RobustSettings, ServerOptimizer

log = logging.getLogger("fedcollab.coordinator")

BLOCK_ELEMENTS = 1 << 20  # robust rules hold (updates x this) float32 values at a time


def optimizer_for(config: StrategyConfig) -> ServerOptimizer | None:
    if config.name not in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        return None
    from fedcollab.aggregation import ServerOptimizer, ServerOptimizerSettings

    overrides = {k: v for k, v in config.model_dump(exclude={"name"}).items() if v is not None}
    return ServerOptimizer(settings=ServerOptimizerSettings.defaults(config.name, **overrides))


def robust_settings_for(config: StrategyConfig) -> RobustSettings | None:
    rule = {"fedmedian": "median", "fedtrimmedavg": "trimmed_mean", "krum": "krum", "multikrum": "multi_krum",
            "bulyan": "bulyan"}.get(config.name)
    if rule is None:
        return None
    from fedcollab.aggregation import RobustSettings

    kwargs: dict[str, Any] = {"rule": rule}
    if config.num_malicious is not None:
        kwargs["num_malicious"] = config.num_malicious
    if config.trim_fraction is not None:
        kwargs["trim_fraction"] = config.trim_fraction
    if config.to_keep is not None:
        kwargs["to_keep"] = config.to_keep
    return RobustSettings(**kwargs)


class OptimizerStates:
    """The server optimizer's state per committed version, on disk."""

    def __init__(self, *, folder: Path, optimizer: ServerOptimizer) -> None:
        self.folder = folder
        self.optimizer = optimizer

    def path(self, version: int) -> Path:
        return self.folder / f"v{version:06d}.safetensors"

    def check(self, *, current_version: int) -> None:
        """At start-up: state files newer than the current model were written by a commit
        that never happened; the current version's must exist once a step was taken."""
        if not self.optimizer.state_names:
            return
        if self.folder.is_dir():
            for p in self.folder.iterdir():
                stem = p.name.split(".")[0]
                if p.suffix == ".tmp" or (stem.startswith("v") and stem[1:].isdigit()
                                          and int(stem[1:]) > current_version):
                    p.unlink()
                    log.warning("removed %s: optimizer state of a commit that never happened", p.name)
        if current_version > 0 and not self.path(current_version).is_file():
            raise ConfigError(
                f"{self.path(current_version)}: the server optimizer's state for model v{current_version} is missing "
                "(it is written with every commit); restore it, or start the study again with a fresh state_dir")

    def step(self, *, base_path: Path, base_version: int, mean: dict[str, torch.Tensor], round_number: int
             ) -> dict[str, str]:
        """mean[name] (flat: the round's mean delta) becomes the new model's values, in
        place, tensor by tensor; the new state is written for version base_version + 1.
        Returns what the lineage records about the step."""
        names = self.optimizer.state_names
        previous = self.path(base_version) if base_version > 0 else None
        if previous is not None and names and not previous.is_file():
            raise RuntimeError(f"{previous}: optimizer state missing (checked at start-up; removed since?)")
        prev_tensors = {t.name: t for t in stored_tensors(previous)} if previous is not None and names else {}
        base = stored_tensors(base_path)
        writer: StreamingWriter | None = None
        tmp = self.folder / f".v{base_version + 1:06d}.tmp"
        if names:
            self.folder.mkdir(parents=True, exist_ok=True)
            writer = StreamingWriter(tmp, specs=[(f"{s}/{t.name}", torch.float32, (t.numel,))
                                                 for t in base for s in names])
        try:
            for t in base:
                params = read_tensor(base_path, t).to(torch.float32)
                state = ({s: read_tensor(previous, prev_tensors[f"{s}/{t.name}"]) for s in names}
                         if prev_tensors and previous is not None else None)
                new_state = self.optimizer.step_(params=params, mean_delta=mean[t.name].to(torch.float32),
                                                 state=state, server_round=round_number)
                mean[t.name].copy_(params)
                if writer is not None:
                    for s in names:
                        writer.write(f"{s}/{t.name}", new_state[s])
        except BaseException:
            if writer is not None:
                writer.abandon()
                tmp.unlink(missing_ok=True)
            raise
        record = {"server_optimizer": self.optimizer.settings.name}
        if writer is not None:
            record["state_sha256"] = writer.finish()
            os.replace(tmp, self.path(base_version + 1))
            fsync_dir(self.folder)
        return record


def dense_blocks(pieces: Iterable[TensorPiece], *, starts: Sequence[int], total: int, block: int
                 ) -> Iterator[torch.Tensor]:
    """The flat update (every tensor, in manifest order) as float32 blocks of `block`
    elements (the last one shorter), from pieces in increasing order; what no piece
    covers (top-k's unsent entries) is zero."""
    buf = torch.zeros(min(block, total), dtype=torch.float32)
    lo = 0  # global element where buf starts
    for p in pieces:
        at = starts[p.index] + p.start
        values = p.values.to(torch.float32)
        while len(values):
            while at >= lo + len(buf):
                yield buf
                lo += len(buf)
                buf = torch.zeros(min(block, total - lo), dtype=torch.float32)
            n = min(len(values), lo + len(buf) - at)
            buf[at - lo:at - lo + n] = values[:n]
            values, at = values[n:], at + n
    while lo < total:
        yield buf
        lo += len(buf)
        if lo < total:
            buf = torch.zeros(min(block, total - lo), dtype=torch.float32)


def robust_mean_deltas(*, kept: Sequence[KeptUpdate], manifest: tensor_pb2.ModelManifest,
                       settings: RobustSettings, block: int = BLOCK_ELEMENTS
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The robust aggregate of the kept updates, flat per tensor, and what the lineage
    records about it (which institutions a Krum-family rule selected)."""
    from fedcollab.aggregation import robust_aggregate

    sizes = [spec_numel(s) for s in manifest.tensors]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)

    def opener(k: KeptUpdate) -> Callable[[], Iterator[torch.Tensor]]:
        return lambda: dense_blocks(k.pieces(), starts=starts, total=total, block=block)

    result = robust_aggregate(updates=[opener(k) for k in kept], weights=[k.weight for k in kept], settings=settings)
    flat = torch.empty(total, dtype=torch.float32)
    at = 0
    for b in result.blocks:
        flat[at:at + len(b)] = b
        at += len(b)
    if at != total:
        raise RuntimeError(f"robust aggregate gave {at} elements, the model has {total}")
    out = {s.name: flat[a:a + n] for s, a, n in zip(manifest.tensors, starts, sizes, strict=True)}
    record: dict[str, Any] = {"rule": settings.rule}
    if result.selected is not None:
        record["selected"] = sorted(kept[i].key for i in result.selected)
    return out, record
