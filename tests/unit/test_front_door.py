"""`fedcollab`'s front door: every public name resolves to the object its module
defines, and `import fedcollab` alone stays light (no torch, no grpc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import fedcollab


@pytest.mark.parametrize("name", sorted(set(fedcollab.__all__) - {"__version__"}))
def test_each_public_name_is_the_defining_modules_object(name: str) -> None:
    value = getattr(fedcollab, name)
    module = sys.modules[value.__module__]
    assert getattr(module, value.__name__) is value
    assert name in dir(fedcollab)


def test_the_errors_are_one_hierarchy() -> None:
    for kind in (fedcollab.ConfigError, fedcollab.RemoteError, fedcollab.InUseError, fedcollab.PkiError):
        assert issubclass(kind, fedcollab.FedcollabError)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Strategyy'"):
        fedcollab.Strategyy  # noqa: B018


def test_importing_fedcollab_alone_imports_neither_torch_nor_grpc() -> None:
    code = "import sys, fedcollab; print(sorted(m for m in ('torch', 'grpc', 'opacus') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
