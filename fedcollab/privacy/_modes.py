"""Choosing Opacus' per-sample-gradient mode by measuring it, once per model.

Which mode is fastest depends on the model: ghost clipping never materialises
per-sample gradients and wins on wide Linear and Conv layers, hooks can win on
sequence models, functorch on layers without a hand-written grad sampler. So the
choice is measured, not guessed: a few DP-SGD steps in each mode on synthetic inputs
(the shape and dtype of the real ones, random values and labels) on a throwaway copy
of the model. Measuring reads no private data and spends no privacy budget.

The choice is cached as JSON, keyed by the model's architecture (class, parameter
names, shapes and trainability), the input shape and dtype, the batch size, the
device type and the torch and Opacus versions, so a daemon measures once per model,
not every round.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import opacus
import torch
from torch import nn

from fedcollab._fileio import atomic_write
from fedcollab.privacy._opacus import GRAD_SAMPLE_MODES, PrivacyError, train_private

log = logging.getLogger("fedcollab.privacy")

CACHE_FILE = "dp-grad-sample-modes.json"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class ModeChoice:
    mode: str  # the fastest mode: argmin of seconds_per_step
    seconds_per_step: dict[str, float]  # every mode that worked on the model
    cached: bool  # True when read from the cache (nothing was measured)


class _StepClock(nn.Module):
    """Wraps the model and notes the time at each forward call, i.e. at the start of
    each DP-SGD step; consecutive stamps give a whole step (sampling the batch, forward,
    per-sample gradients, clipping, noise, optimizer step).

    The wrapper has no parameters of its own, so Opacus never hooks or vmaps it; and
    it keeps a function, not a list, because train_private deep-copies the model:
    functions survive a deep copy as themselves, so the copy's stamps land here."""

    def __init__(self, model: nn.Module, stamp: Callable[[], None]) -> None:
        super().__init__()
        self.model = model
        self.stamp = stamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stamp()
        return self.model(x)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def synthetic_inputs(*, model: nn.Module, example_x: torch.Tensor, n: int, generator: torch.Generator,
                     device: torch.device) -> torch.Tensor:
    """n random inputs shaped and typed like example_x's examples (its values are never read).

    Floats are standard normal; integer inputs (token ids) are uniform below the
    smallest nn.Embedding's size in the model, so every id is valid; booleans are fair coins."""
    shape = (n, *example_x.shape[1:])
    dtype = example_x.dtype
    if dtype.is_floating_point:
        x = torch.randn(shape, generator=generator, dtype=dtype)
    elif dtype == torch.bool:
        x = torch.randint(0, 2, shape, generator=generator).bool()
    else:
        sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
        x = torch.randint(0, min(sizes, default=2), shape, generator=generator, dtype=dtype)
    return x.to(device)


def measure_modes(
    *,
    model: nn.Module,
    example_x: torch.Tensor,
    num_classes: int,
    batch_size: int,
    modes: Sequence[str] = GRAD_SAMPLE_MODES,
    steps: int = 3,
    warmup: int = 1,
    passes: int = 2,
) -> dict[str, float]:
    """Seconds per DP-SGD step in each mode that works on `model`. A mode that raises (a
    layer it cannot handle, ...) is left out and logged at debug level; an empty dict
    means none worked.

    `example_x` is a batch of real inputs, e.g. `x[:1]`: its first dimension is the batch,
    and only its shape[1:], dtype and device are used. Each mode trains a deep copy of
    `model` with `train_private` (what is timed is what trains) on batch_size x (warmup +
    steps + 1) synthetic examples with random labels, Poisson-sampled to batches of
    batch_size on average, the same batches for every mode; a run's figure is the median
    of its `steps` steps after `warmup` untimed ones. Each working mode is run `passes`
    times, the order reversed each pass, and keeps its lowest figure: other load on the
    machine only ever adds time, and a choice that is cached for good should not rest on
    one run that a busy neighbour slowed down.
    """
    if batch_size < 1 or steps < 1 or warmup < 0 or num_classes < 1 or passes < 1:
        raise ValueError(f"need batch_size >= 1, steps >= 1, warmup >= 0, num_classes >= 1, passes >= 1; got "
                         f"batch_size={batch_size}, steps={steps}, warmup={warmup}, num_classes={num_classes}, "
                         f"passes={passes}")
    if example_x.dim() < 1:
        raise ValueError("example_x must have a batch dimension first, e.g. x[:1]")
    device = _device_of(model)
    batches = warmup + steps + 1  # the +1: a step's end is the next step's start
    n = batch_size * batches
    seed_gen = torch.Generator().manual_seed(0)
    x = synthetic_inputs(model=model, example_x=example_x, n=n, generator=seed_gen, device=device)
    y = torch.randint(0, num_classes, (n,), generator=seed_gen).to(device)
    results: dict[str, float] = {}
    working = list(modes)
    for i in range(passes):
        for mode in working if i % 2 == 0 else working[::-1]:
            seconds = _time_mode(model=model, x=x, y=y, batch_size=batch_size, mode=mode, warmup=warmup)
            if seconds is not None:
                results[mode] = min(seconds, results.get(mode, seconds))
        working = [m for m in working if m in results]  # a mode that failed is not tried again
    return {mode: results[mode] for mode in modes if mode in results}


def _time_mode(*, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, mode: str,
               warmup: int) -> float | None:
    """Median seconds per step of one short private epoch in `mode`; None if the mode fails."""
    device = x.device
    batches = len(y) // batch_size
    stamps: list[float] = []
    clocked = _StepClock(copy.deepcopy(model), lambda: stamps.append(time.perf_counter()))
    # A seeded generator draws the same batches (and noise) in every mode; Opacus
    # wants the noise generator on the parameters' device, so none off the CPU.
    generator = torch.Generator().manual_seed(1) if device.type == "cpu" else None
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' hook and autocast chatter
            train_private(
                model=clocked, x=x, y=y, epochs=1, batch_size=batch_size, optimizer="sgd",
                learning_rate=1e-3, noise_multiplier=1.0, max_grad_norm=1.0, mode=mode, generator=generator,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any failure means "this mode does not work here"
        log.debug("grad_sample_mode %r does not work on %s: %s", mode, type(model).__name__, exc, exc_info=True)
        return None
    end = time.perf_counter()
    intervals = [b - a for a, b in itertools.pairwise(stamps)][warmup:]
    if intervals:
        return statistics.median(intervals)
    # (almost) every batch came out empty: the whole run, per batch
    return (end - (stamps[0] if stamps else start)) / batches


def cache_key(*, model: nn.Module, example_x: torch.Tensor, batch_size: int, device: torch.device,
              modes: Sequence[str] = GRAD_SAMPLE_MODES) -> str:
    """What the timing depends on: the architecture (not the weights), the input shape
    and dtype, the batch size, the device type, the modes tried and the library versions."""
    cls = type(model)
    described = {
        "model": f"{cls.__module__}.{cls.__qualname__}",
        "parameters": [[name, list(p.shape), str(p.dtype), p.requires_grad] for name, p in model.named_parameters()],
        "input_shape": list(example_x.shape[1:]),
        "input_dtype": str(example_x.dtype),
        "batch_size": batch_size,
        "device": device.type,
        "modes": list(modes),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path) -> dict[str, dict]:
    """The cache's entries; a missing file is empty, an unreadable one is ignored with a warning."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("cannot read the grad_sample_mode cache %s (%s): measuring again", path, exc)
        return {}
    try:
        data = json.loads(raw)
        if (not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT
                or not isinstance(data.get("entries"), dict)):
            raise ValueError("not a cache of this format")
        return data["entries"]
    except ValueError as exc:  # JSONDecodeError is a ValueError
        log.warning("ignoring the corrupt grad_sample_mode cache %s (%s): measuring again; it will be rewritten",
                    path, exc)
        return {}


def _cached_choice(entry: object, modes: Sequence[str]) -> ModeChoice | None:
    """A valid cache entry as a ModeChoice, else None (then it is measured again)."""
    if not isinstance(entry, dict):
        return None
    mode, seconds = entry.get("mode"), entry.get("seconds_per_step")
    if mode not in modes or not isinstance(seconds, dict) or mode not in seconds:
        return None
    if not all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in seconds.items()):
        return None
    return ModeChoice(mode=str(mode), seconds_per_step={k: float(v) for k, v in seconds.items()}, cached=True)


def _write_cache(path: Path, key: str, choice: ModeChoice, model: nn.Module, batch_size: int) -> None:
    """Adds the entry to the cache atomically (temporary file + os.replace), re-reading
    the file first so entries written meanwhile by another process are kept."""
    entries = _read_cache(path)
    entries[key] = {
        "mode": choice.mode,
        "seconds_per_step": choice.seconds_per_step,
        "model": type(model).__name__,
        "batch_size": batch_size,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write(path, json.dumps({"format": _CACHE_FORMAT, "entries": entries}, indent=1, sort_keys=True).encode())


def choose_grad_sample_mode(
    *,
    model: nn.Module,
    example_x: torch.Tensor,
    num_classes: int,
    batch_size: int,
    cache_dir: Path | None = None,
    device: torch.device | None = None,
) -> ModeChoice:
    """The fastest of GRAD_SAMPLE_MODES for this model, input and batch size.

    Read from `cache_dir / "dp-grad-sample-modes.json"` when this configuration was
    measured before (cached=True); otherwise measured with `measure_modes` on `device`
    (default: where the model's parameters are) and written to the cache. Without a
    cache_dir it measures every call. `example_x` is a batch of real inputs (e.g. x[:1]);
    only its shape and dtype are used. Raises PrivacyError when no mode works.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    key = cache_key(model=model, example_x=example_x, batch_size=batch_size, device=device)
    path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
    if path is not None:
        cached = _cached_choice(_read_cache(path).get(key), GRAD_SAMPLE_MODES)
        if cached is not None:
            return cached
    subject = copy.deepcopy(model).to(device)
    seconds = measure_modes(model=subject, example_x=example_x, num_classes=num_classes, batch_size=batch_size)
    if not seconds:
        raise PrivacyError(
            f"none of Opacus' grad_sample_modes ({', '.join(GRAD_SAMPLE_MODES)}) could train {type(model).__name__}: "
            "check it with fedcollab.privacy._opacus.validate_model (run with debug logging for each mode's error)"
        )
    best = min(seconds, key=seconds.__getitem__)
    choice = ModeChoice(mode=best, seconds_per_step=seconds, cached=False)
    if path is not None:
        try:
            _write_cache(path, key, choice, model, batch_size)
        except OSError as exc:  # a cache we cannot write costs a re-measure, not the round
            log.warning("cannot write the grad_sample_mode cache %s (%s)", path, exc)
    return choice
