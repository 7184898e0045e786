"""Who masks with whom (the SecAgg+ graph) and how many shares unmask one institution.

Small rounds use the complete graph (SecAgg). Beyond `COMPLETE_UP_TO` institutions
each one masks with k = O(log n) neighbours (SecAgg+, Bell et al. 2020): a Harary
graph, i.e. a ring of the institutions in a random order (drawn by the coordinator per
round) where each is linked to its k/2 nearest on either side. Every institution then
does O(log n) key agreements and mask expansions instead of n - 1.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

COMPLETE_UP_TO = 20


def degree_for(n: int, neighbours: str | int) -> int:
    """Neighbours per institution for a round of n (n - 1 means the complete graph).
    An int can raise the degree above "auto", never lower it: institutions refuse a
    graph sparser than "auto" (a coordinator could otherwise shrink the neighbourhood
    that holds each secret)."""
    if n < 2:
        return 0
    k = n - 1 if n <= COMPLETE_UP_TO else 2 * math.ceil(1.5 * math.log2(n))  # even, ~3 log2 n (Bell et al.)
    if neighbours != "auto":
        k = max(k, int(neighbours))
    return min(n - 1, k + (k % 2))  # even on a ring, unless complete


def neighbour_graph(names: Sequence[str], *, degree: int, seed: bytes) -> dict[str, list[str]]:
    """Symmetric neighbour lists (sorted) for `names` with `degree` neighbours each."""
    ordered = sorted(names)
    n = len(ordered)
    if degree >= n - 1:
        return {a: [b for b in ordered if b != a] for a in ordered}
    ring = ordered[:]
    random.Random(seed).shuffle(ring)  # the graph's layout, not a secret: any fixed order would do
    half = degree // 2
    graph: dict[str, set[str]] = {a: set() for a in ordered}
    for i, a in enumerate(ring):
        for step in range(1, half + 1):
            b = ring[(i + step) % n]
            graph[a].add(b)
            graph[b].add(a)
    return {a: sorted(v) for a, v in graph.items()}


def threshold_for(neighbourhood: int, setting: int | float) -> int:
    """Shamir threshold t for a neighbourhood of `neighbourhood` holders (the institution
    and its neighbours): a count, or a fraction rounded up; at least 2, at most all,
    and always above half of the neighbourhood."""
    t = setting if isinstance(setting, int) else math.ceil(setting * neighbourhood - 1e-9)
    # Never half or less: two disjoint groups of t holders could then each be shown a
    # different list of survivors and hand over both secrets of one institution, and
    # institutions refuse such a round. A count below that is raised to a majority (a
    # fraction above 0.5, which the config requires, always gives one).
    t = max(t, neighbourhood // 2 + 1)
    if t > neighbourhood:
        raise ValueError(f"reconstruction_threshold {setting} needs {t} shares, but each institution has only "
                         f"{neighbourhood} holders (itself and its neighbours); lower the threshold or add neighbours")
    return max(2, t)
