"""What a decoder says when an encoded update is malformed."""

from __future__ import annotations


class EncodingError(ValueError):
    """An encoded update breaks its format. `reason` is UPPER_SNAKE and stable (the
    coordinator sends it back as the upload's ErrorInfo reason); `metadata` holds the
    dynamic values (a tensor's name, an offending index)."""

    def __init__(self, reason: str, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = metadata
