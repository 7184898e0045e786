"""The math of institution-level DP at the coordinator, as pure functions: DP-FedAvg
(McMahan et al. 2018) with adaptive clipping (Andrew et al. 2021).

Each institution's whole update is clipped to L2 norm S, the average is uniform (every
institution counts once, whatever it reports as its example count), and Gaussian noise
of std z_delta * S / n is added to each coordinate of the average. The streaming sum
(coordinator/_round_sum.py) and the round engine call these; the round-to-round state
(clip norm, accounting) is fedcollab.privacy.CentralDP.
"""

from __future__ import annotations

import math
import secrets

import torch

# Noise is drawn into a buffer of this many elements at a time (4 MiB of float32), so
# adding it never allocates a second copy of a large tensor.
NOISE_PIECE_NUMEL = 1 << 20


def clip_scale(*, norm: float, clip_norm: float) -> float:
    """min(1, S / ||delta||): the factor that brings an update down to norm S."""
    if not (math.isfinite(norm) and norm >= 0):
        raise ValueError(f"an update's norm must be finite and non-negative, got {norm}")
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def update_noise_multiplier(*, noise_multiplier: float, count_noise_multiplier: float | None) -> float:
    """z_delta, the noise multiplier left for the updates.

    Without adaptive clipping it is z. With it, the noised count of unclipped updates
    takes a share: the pair (z_delta, sigma_b) is as private as one Gaussian mechanism
    of multiplier z when (z_delta^-2 + (2 sigma_b)^-2)^-1/2 = z (Andrew et al. 2021,
    Thm. 1), so z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2.
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must not be negative, got {noise_multiplier}")
    if count_noise_multiplier is None or noise_multiplier == 0:
        return noise_multiplier
    left = noise_multiplier**-2 - (2 * count_noise_multiplier) ** -2
    if left <= 0:
        raise ValueError(
            f"count_noise_multiplier {count_noise_multiplier} must exceed half of noise_multiplier "
            f"{noise_multiplier}: its share of the privacy would leave none for the updates"
        )
    return left**-0.5


def noise_std(*, update_noise_multiplier: float, clip_norm: float, num_updates: int) -> float:
    """Per-coordinate std of the noise on the average: z_delta * S / n.

    That is noise z_delta * S on the sum of clipped updates, whose sensitivity to adding
    or removing one institution is S (the convention of the accountants). Dividing by n,
    the number of accepted updates, treats n as public, as Flower's
    DifferentialPrivacyServerSideFixedClipping does; McMahan et al. divide by a fixed
    expected count instead."""
    if num_updates <= 0:
        raise ValueError("no update was aggregated")
    return update_noise_multiplier * clip_norm / num_updates


def next_clip_norm(
    *,
    clip_norm: float,
    num_unclipped: int,
    num_updates: int,
    target_quantile: float,
    learning_rate: float,
    count_noise_multiplier: float,
    generator: torch.Generator,
) -> float:
    """S * exp(-eta_C * (b - gamma)), with b = (sum_k b_k + N(0, sigma_b^2)) / n the
    noised share of updates whose norm was within S (Andrew et al. 2021, geometric
    update). All within S -> S shrinks; all clipped -> S grows."""
    if num_updates <= 0 or not 0 <= num_unclipped <= num_updates:
        raise ValueError(f"need 0 <= num_unclipped <= num_updates > 0, got {num_unclipped} of {num_updates}")
    noise = torch.randn((), generator=generator, dtype=torch.float64).item() * count_noise_multiplier
    share = (num_unclipped + noise) / num_updates
    return clip_norm * math.exp(-learning_rate * (share - target_quantile))


def noise_generator() -> torch.Generator:
    """A torch generator with a fresh 63-bit seed from the OS's CSPRNG.

    Like Opacus without secure_mode, the Gaussian samples themselves come from torch's
    Mersenne-Twister/Box-Muller, not a cryptographically secure floating-point sampler
    (Mironov 2012's attacks on floating-point noise are out of scope). The seed is
    secret and new for every draw of noise, so the noise cannot be replayed.
    """
    return torch.Generator().manual_seed(secrets.randbits(63))


def add_gaussian_noise_(
    flat: torch.Tensor, *, std: float, generator: torch.Generator, piece_numel: int = NOISE_PIECE_NUMEL
) -> None:
    """flat += N(0, std^2) per element, in place, drawn piece by piece into one
    bounded buffer (flat must be a contiguous 1-D floating-point tensor). About 0.15 s
    for 50M float32 coordinates on a 2-core VM (benchmarks/central_dp_clip.py)."""
    if not flat.is_floating_point() or flat.dim() != 1:
        raise ValueError(f"noise goes on 1-D floating-point tensors, got {flat.dtype} of shape {tuple(flat.shape)}")
    if std <= 0 or flat.numel() == 0:
        return
    buf = torch.empty(min(piece_numel, flat.numel()), dtype=flat.dtype)
    for start in range(0, flat.numel(), piece_numel):
        part = flat[start : start + piece_numel]
        noise = buf[: part.numel()]
        noise.normal_(0.0, std, generator=generator)
        part.add_(noise)
