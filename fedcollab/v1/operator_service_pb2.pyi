from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ("study", "page_size", "page_token")
    STUDY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    study: str
    page_size: int
    page_token: str
    def __init__(self, study: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class SubmitStudyRequest(_message.Message):
    __slots__ = ("study_toml",)
    STUDY_TOML_FIELD_NUMBER: _ClassVar[int]
    study_toml: str
    def __init__(self, study_toml: _Optional[str] = ...) -> None: ...

class StudySummary(_message.Message):
    __slots__ = ("name", "status", "rounds_committed", "total_rounds", "model_kind", "strategy", "min_institutions", "submitted_by", "submitted_at", "reason", "start_after", "is_default", "declined", "online")
    class DeclinedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_COMMITTED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_KIND_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MIN_INSTITUTIONS_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_BY_FIELD_NUMBER: _ClassVar[int]
    SUBMITTED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    START_AFTER_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    name: str
    status: str
    rounds_committed: int
    total_rounds: int
    model_kind: str
    strategy: str
    min_institutions: int
    submitted_by: str
    submitted_at: float
    reason: str
    start_after: str
    is_default: bool
    declined: _containers.ScalarMap[str, str]
    online: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., status: _Optional[str] = ..., rounds_committed: _Optional[int] = ..., total_rounds: _Optional[int] = ..., model_kind: _Optional[str] = ..., strategy: _Optional[str] = ..., min_institutions: _Optional[int] = ..., submitted_by: _Optional[str] = ..., submitted_at: _Optional[float] = ..., reason: _Optional[str] = ..., start_after: _Optional[str] = ..., is_default: _Optional[bool] = ..., declined: _Optional[_Mapping[str, str]] = ..., online: _Optional[_Iterable[str]] = ...) -> None: ...

class ListStudiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStudiesResponse(_message.Message):
    __slots__ = ("studies",)
    STUDIES_FIELD_NUMBER: _ClassVar[int]
    studies: _containers.RepeatedCompositeFieldContainer[StudySummary]
    def __init__(self, studies: _Optional[_Iterable[_Union[StudySummary, _Mapping]]] = ...) -> None: ...

class ChangeStudyRequest(_message.Message):
    __slots__ = ("study", "action", "reason")
    STUDY_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    study: str
    action: str
    reason: str
    def __init__(self, study: _Optional[str] = ..., action: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Membership(_message.Message):
    __slots__ = ("institution", "status", "reason", "changed_by", "changed_at", "online", "last_seen", "num_train_examples")
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHANGED_BY_FIELD_NUMBER: _ClassVar[int]
    CHANGED_AT_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    institution: str
    status: str
    reason: str
    changed_by: str
    changed_at: float
    online: bool
    last_seen: float
    num_train_examples: int
    def __init__(self, institution: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., changed_by: _Optional[str] = ..., changed_at: _Optional[float] = ..., online: _Optional[bool] = ..., last_seen: _Optional[float] = ..., num_train_examples: _Optional[int] = ...) -> None: ...

class ListInstitutionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListInstitutionsResponse(_message.Message):
    __slots__ = ("institutions",)
    INSTITUTIONS_FIELD_NUMBER: _ClassVar[int]
    institutions: _containers.RepeatedCompositeFieldContainer[Membership]
    def __init__(self, institutions: _Optional[_Iterable[_Union[Membership, _Mapping]]] = ...) -> None: ...

class SetMembershipRequest(_message.Message):
    __slots__ = ("institution", "status", "reason")
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    institution: str
    status: str
    reason: str
    def __init__(self, institution: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PublishModelRequest(_message.Message):
    __slots__ = ("study", "version")
    STUDY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    study: str
    version: int
    def __init__(self, study: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class PublishModelResponse(_message.Message):
    __slots__ = ("study", "version", "sha256")
    STUDY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    study: str
    version: int
    sha256: str
    def __init__(self, study: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("federation", "study", "total_rounds", "finished", "rounds", "institutions", "next_page_token", "total_size")
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    STUDY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    INSTITUTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    federation: str
    study: str
    total_rounds: int
    finished: bool
    rounds: _containers.RepeatedCompositeFieldContainer[RoundStatus]
    institutions: _containers.RepeatedCompositeFieldContainer[InstitutionStatus]
    next_page_token: str
    total_size: int
    def __init__(self, federation: _Optional[str] = ..., study: _Optional[str] = ..., total_rounds: _Optional[int] = ..., finished: _Optional[bool] = ..., rounds: _Optional[_Iterable[_Union[RoundStatus, _Mapping]]] = ..., institutions: _Optional[_Iterable[_Union[InstitutionStatus, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class ListLineageRequest(_message.Message):
    __slots__ = ("from_version", "study")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    STUDY_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    study: str
    def __init__(self, from_version: _Optional[int] = ..., study: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("public_key", "entries", "published_versions")
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    public_key: bytes
    entries: _containers.RepeatedCompositeFieldContainer[LineageEntry]
    published_versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, public_key: _Optional[bytes] = ..., entries: _Optional[_Iterable[_Union[LineageEntry, _Mapping]]] = ..., published_versions: _Optional[_Iterable[int]] = ...) -> None: ...
