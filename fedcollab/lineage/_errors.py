"""The one error of signed lineage."""

from __future__ import annotations

from fedcollab.errors import FedcollabError


class LineageError(FedcollabError):
    """A lineage record, its signature or the key that signed it cannot be trusted.

    `reason` is UPPER_SNAKE and stable (callers branch on it): LINEAGE_INVALID for a
    record or signature that does not verify, LINEAGE_MISSING for a model handed out
    without one, LINEAGE_KEY_MISMATCH for a coordinator key other than the pinned one,
    LINEAGE_KEY_MISSING for a coordinator that sends none, LINEAGE_KEY_INVALID for a
    key file that cannot be used."""

    def __init__(self, message: str, *, reason: str = "LINEAGE_INVALID") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
