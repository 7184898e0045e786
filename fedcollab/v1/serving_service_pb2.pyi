from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_KIND_UNSPECIFIED: _ClassVar[InputKind]
    INPUT_KIND_FLOAT: _ClassVar[InputKind]
    INPUT_KIND_TOKENS: _ClassVar[InputKind]
INPUT_KIND_UNSPECIFIED: InputKind
INPUT_KIND_FLOAT: InputKind
INPUT_KIND_TOKENS: InputKind

class PredictRequest(_message.Message):
    __slots__ = ("shape", "values", "tokens")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("label", "probabilities")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    label: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, label: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predictions", "num_classes", "model_version", "model_sha256")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    num_classes: int
    model_version: int
    model_sha256: str
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., num_classes: _Optional[int] = ..., model_version: _Optional[int] = ..., model_sha256: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("kind", "shape", "max_length", "vocab_size", "description")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    kind: InputKind
    shape: _containers.RepeatedScalarFieldContainer[int]
    max_length: int
    vocab_size: int
    description: str
    def __init__(self, kind: _Optional[_Union[InputKind, str]] = ..., shape: _Optional[_Iterable[int]] = ..., max_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class InstitutionPrivacy(_message.Message):
    __slots__ = ("institution", "epsilon", "delta", "budget_epsilon")
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    BUDGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    institution: str
    epsilon: float
    delta: float
    budget_epsilon: float
    def __init__(self, institution: _Optional[str] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., budget_epsilon: _Optional[float] = ...) -> None: ...

class PrivacySummary(_message.Message):
    __slots__ = ("institutions", "max_epsilon", "central_dp", "central_epsilon", "central_delta")
    INSTITUTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_EPSILON_FIELD_NUMBER: _ClassVar[int]
    CENTRAL_DP_FIELD_NUMBER: _ClassVar[int]
    CENTRAL_EPSILON_FIELD_NUMBER: _ClassVar[int]
    CENTRAL_DELTA_FIELD_NUMBER: _ClassVar[int]
    institutions: _containers.RepeatedCompositeFieldContainer[InstitutionPrivacy]
    max_epsilon: float
    central_dp: bool
    central_epsilon: float
    central_delta: float
    def __init__(self, institutions: _Optional[_Iterable[_Union[InstitutionPrivacy, _Mapping]]] = ..., max_epsilon: _Optional[float] = ..., central_dp: _Optional[bool] = ..., central_epsilon: _Optional[float] = ..., central_delta: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("federation", "study", "version", "sha256", "kind", "input", "num_classes", "rounds", "contributors", "metrics", "privacy", "max_batch", "published_at", "lineage_key_fingerprint", "lineage_key_pinned")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    STUDY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_KEY_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_KEY_PINNED_FIELD_NUMBER: _ClassVar[int]
    federation: str
    study: str
    version: int
    sha256: str
    kind: str
    input: InputSpec
    num_classes: int
    rounds: int
    contributors: _containers.RepeatedScalarFieldContainer[str]
    metrics: _containers.ScalarMap[str, float]
    privacy: PrivacySummary
    max_batch: int
    published_at: str
    lineage_key_fingerprint: str
    lineage_key_pinned: bool
    def __init__(self, federation: _Optional[str] = ..., study: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., kind: _Optional[str] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., num_classes: _Optional[int] = ..., rounds: _Optional[int] = ..., contributors: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., privacy: _Optional[_Union[PrivacySummary, _Mapping]] = ..., max_batch: _Optional[int] = ..., published_at: _Optional[str] = ..., lineage_key_fingerprint: _Optional[str] = ..., lineage_key_pinned: _Optional[bool] = ...) -> None: ...
