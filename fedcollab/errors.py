"""Exceptions, grouped by how a caller reacts to them."""

from __future__ import annotations

from collections.abc import Mapping

import grpc


class FedcollabError(Exception):
    """Base class of every error fedcollab raises on purpose."""


class ConfigError(FedcollabError):
    """A configuration file or value is wrong; the message names the file and key."""


class Rejected(FedcollabError):
    """The coordinator refuses a request: it becomes a gRPC status with an ErrorInfo.

    `reason` is UPPER_SNAKE and stable (clients branch on it); `message` is for people.
    """

    def __init__(
        self,
        *,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(f"{reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}


class RemoteError(FedcollabError):
    """The coordinator answered an institution's call with an error status."""

    def __init__(self, *, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


class PkiError(FedcollabError):
    """The federation PKI refuses an operation (a bad CSR, a name already certified, a
    revocation list that does not verify); the message says what to do instead."""


class InUseError(FedcollabError):
    """A port or a state folder that another process (or another object in this one)
    already holds; the message names it, its holder where known, and the key to change."""
