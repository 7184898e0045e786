"""Serving a pulled model version: `ModelServer` checks the file against its card and
signed lineage, then answers predictions over gRPC (fedcollab.v1.PredictionService)
and HTTP/JSON. `fedcollab serve` is its command.

The server's names load on first use (PEP 562), so registering the command does not
import torch."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedcollab.serving._addresses import DEFAULT_GRPC_ADDRESS, DEFAULT_HTTP_ADDRESS
from fedcollab.serving._cli import add_serve_command

if TYPE_CHECKING:
    from fedcollab.serving._connections import HttpLimits
    from fedcollab.serving._http import MAX_BODY_BYTES
    from fedcollab.serving._inputs import InputSpec, ServingError
    from fedcollab.serving._model import LoadedModel
    from fedcollab.serving._server import ModelServer

__all__ = [
    "DEFAULT_GRPC_ADDRESS",
    "DEFAULT_HTTP_ADDRESS",
    "HttpLimits",
    "MAX_BODY_BYTES",
    "InputSpec",
    "LoadedModel",
    "ModelServer",
    "ServingError",
    "add_serve_command",
]

_LAZY = {
    "MAX_BODY_BYTES": "_http", "InputSpec": "_inputs", "ServingError": "_inputs", "LoadedModel": "_model",
    "ModelServer": "_server", "HttpLimits": "_connections",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"fedcollab.serving.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fedcollab.serving' has no attribute {name!r}")
