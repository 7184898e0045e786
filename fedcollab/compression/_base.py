"""The decoder interface, and what record-based decoders share: the expected length,
and carry-over of a record split across two chunks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Protocol

from fedcollab.compression._errors import EncodingError
from fedcollab.wire import TensorPiece


class UpdateDecoder(Protocol):
    """Turns an encoded update, fed in arbitrary byte pieces (chunks) in order, into
    `TensorPiece`s of values to fold, checking every byte as it arrives; a malformed
    stream raises EncodingError. Feeding the same bytes split any other way yields the
    same values for the same elements: a spool re-read in other block sizes rebuilds
    exactly what was folded."""

    total: int  # the encoded stream's exact length in bytes

    @property
    def received(self) -> int: ...

    @property
    def complete(self) -> bool: ...

    def feed(self, data: bytes | memoryview) -> Iterable[TensorPiece]: ...


class RecordDecoder(ABC):
    """An UpdateDecoder for streams of records: a record split between two chunks waits
    in the carry-over (at most one record), so memory stays at one chunk whatever the
    update's size."""

    def __init__(self, *, total: int) -> None:
        self.total = total
        self._received = 0
        self._carry = bytearray()

    @property
    def received(self) -> int:
        return self._received

    @property
    def complete(self) -> bool:
        return self._received == self.total

    def feed(self, data: bytes | memoryview) -> Iterable[TensorPiece]:
        """The pieces of the records completed by `data`; raises EncodingError."""
        if self._received + len(data) > self.total:
            raise EncodingError("SIZE_MISMATCH", f"stream longer than its encoding allows: "
                                f"{self._received + len(data)} > {self.total} bytes", expected=self.total)
        self._received += len(data)
        buf = self._carry
        buf += data
        pieces, used = self._decode(buf)
        self._carry = buf[used:]
        return pieces

    @abstractmethod
    def _decode(self, buf: bytearray) -> tuple[Iterable[TensorPiece], int]:
        """Checks and decodes the whole records at the start of `buf`: their pieces and
        how many bytes they took. The caller keeps the rest for the next chunk."""
