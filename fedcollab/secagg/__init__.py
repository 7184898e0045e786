"""Secure aggregation (SecAgg+, Bell et al. 2020): the coordinator learns only the sum
of the institutions' updates. Pairwise and self masks from X25519 + HKDF + ChaCha20,
Shamir sharing for dropouts, a SecAgg+ neighbour graph, and distributed DP (Skellam
noise added by each institution before masking). Keys, seed and share commitments and
survivor lists are signed with the institutions' federation certificates, so a
coordinator that lies cannot substitute keys, equivocate about who survived, or pass
a crafted share off as good."""

from fedcollab.secagg._advert import MASK_PRIVATE_KEY, SELF_MASK_SEED, Advertisement, RoundShape, survivors_bytes
from fedcollab.secagg._client import InstitutionSecAgg, RoundSetup, SecAggError, pair_context
from fedcollab.secagg._graph import degree_for, neighbour_graph, threshold_for
from fedcollab.secagg._identity import PeerVerifier, SignatureProblem, SigningIdentity
from fedcollab.secagg._masks import apply_masks, mask, pair_seed
from fedcollab.secagg._quantize import Quantizer
from fedcollab.secagg._server import Removal, removal_seeds
from fedcollab.secagg._shamir import PRIME, Share, combine, split

__all__ = [
    "MASK_PRIVATE_KEY", "PRIME", "SELF_MASK_SEED", "Advertisement", "InstitutionSecAgg", "PeerVerifier", "Quantizer",
    "Removal", "RoundSetup", "RoundShape", "SecAggError", "Share", "SignatureProblem", "SigningIdentity",
    "apply_masks", "combine", "degree_for", "mask", "neighbour_graph", "pair_context", "pair_seed", "removal_seeds",
    "split", "survivors_bytes", "threshold_for",
]
