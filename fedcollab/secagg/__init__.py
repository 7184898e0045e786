"""Secure aggregation (SecAgg+, Bell et al. 2020): the coordinator learns only the sum
of the institutions' updates. This package holds the cryptographic primitives: pairwise
and self masks from X25519 + HKDF + ChaCha20, and Shamir sharing for dropouts."""

from fedcollab.secagg._masks import apply_masks, mask, pair_seed
from fedcollab.secagg._quantize import Quantizer
from fedcollab.secagg._shamir import PRIME, Share, combine, split

__all__ = ["PRIME", "Quantizer", "Share", "apply_masks", "combine", "mask", "pair_seed", "split"]
