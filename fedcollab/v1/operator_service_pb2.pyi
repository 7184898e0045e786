from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round", "attempt", "status", "model_version", "reason", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    status: str
    model_version: int
    reason: str
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., status: _Optional[str] = ..., model_version: _Optional[int] = ..., reason: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class InstitutionStatus(_message.Message):
    __slots__ = ("name", "online", "num_train_examples", "epsilon", "budget_epsilon")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    BUDGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    name: str
    online: bool
    num_train_examples: int
    epsilon: float
    budget_epsilon: float
    def __init__(self, name: _Optional[str] = ..., online: _Optional[bool] = ..., num_train_examples: _Optional[int] = ..., epsilon: _Optional[float] = ..., budget_epsilon: _Optional[float] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("federation", "study", "total_rounds", "finished", "rounds", "institutions")
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    STUDY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    INSTITUTIONS_FIELD_NUMBER: _ClassVar[int]
    federation: str
    study: str
    total_rounds: int
    finished: bool
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    institutions: _containers.RepeatedCompositeFieldContainer[InstitutionStatus]
    def __init__(self, federation: _Optional[str] = ..., study: _Optional[str] = ..., total_rounds: _Optional[int] = ..., finished: _Optional[bool] = ..., rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., institutions: _Optional[_Iterable[_Union[InstitutionStatus, _Mapping]]] = ...) -> None: ...

class ListLineageRequest(_message.Message):
    __slots__ = ("from_version",)
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    def __init__(self, from_version: _Optional[int] = ...) -> None: ...

class LineageEntry(_message.Message):
    __slots__ = ("version", "record", "signature")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    version: int
    record: bytes
    signature: bytes
    def __init__(self, version: _Optional[int] = ..., record: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ListLineageResponse(_message.Message):
    __slots__ = ("public_key", "entries")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    entries: _containers.RepeatedCompositeFieldContainer[LineageEntry]
    def __init__(self, public_key: _Optional[bytes] = ..., entries: _Optional[_Iterable[_Union[LineageEntry, _Mapping]]] = ...) -> None: ...
