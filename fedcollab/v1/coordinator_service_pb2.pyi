from fedcollab.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_WAIT: _ClassVar[TaskKind]
    TASK_KIND_TRAIN: _ClassVar[TaskKind]
    TASK_KIND_EVALUATE: _ClassVar[TaskKind]
    TASK_KIND_FINISHED: _ClassVar[TaskKind]

class CompressionMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_METHOD_UNSPECIFIED: _ClassVar[CompressionMethod]
    COMPRESSION_METHOD_NONE: _ClassVar[CompressionMethod]
    COMPRESSION_METHOD_FP16: _ClassVar[CompressionMethod]
    COMPRESSION_METHOD_BF16: _ClassVar[CompressionMethod]
    COMPRESSION_METHOD_INT8: _ClassVar[CompressionMethod]
    COMPRESSION_METHOD_TOPK: _ClassVar[CompressionMethod]

class SecAggStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEC_AGG_STAGE_UNSPECIFIED: _ClassVar[SecAggStage]
    SEC_AGG_STAGE_ADVERTISE_KEYS: _ClassVar[SecAggStage]
    SEC_AGG_STAGE_SHARE_KEYS: _ClassVar[SecAggStage]
    SEC_AGG_STAGE_MASKED_INPUT: _ClassVar[SecAggStage]
    SEC_AGG_STAGE_UNMASK: _ClassVar[SecAggStage]
    SEC_AGG_STAGE_DONE: _ClassVar[SecAggStage]
    SEC_AGG_STAGE_CONSISTENCY_CHECK: _ClassVar[SecAggStage]

class SecretKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECRET_KIND_UNSPECIFIED: _ClassVar[SecretKind]
    SECRET_KIND_SELF_MASK_SEED: _ClassVar[SecretKind]
    SECRET_KIND_MASK_PRIVATE_KEY: _ClassVar[SecretKind]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_WAIT: TaskKind
TASK_KIND_TRAIN: TaskKind
TASK_KIND_EVALUATE: TaskKind
TASK_KIND_FINISHED: TaskKind
COMPRESSION_METHOD_UNSPECIFIED: CompressionMethod
COMPRESSION_METHOD_NONE: CompressionMethod
COMPRESSION_METHOD_FP16: CompressionMethod
COMPRESSION_METHOD_BF16: CompressionMethod
COMPRESSION_METHOD_INT8: CompressionMethod
COMPRESSION_METHOD_TOPK: CompressionMethod
SEC_AGG_STAGE_UNSPECIFIED: SecAggStage
SEC_AGG_STAGE_ADVERTISE_KEYS: SecAggStage
SEC_AGG_STAGE_SHARE_KEYS: SecAggStage
SEC_AGG_STAGE_MASKED_INPUT: SecAggStage
SEC_AGG_STAGE_UNMASK: SecAggStage
SEC_AGG_STAGE_DONE: SecAggStage
SEC_AGG_STAGE_CONSISTENCY_CHECK: SecAggStage
SECRET_KIND_UNSPECIFIED: SecretKind
SECRET_KIND_SELF_MASK_SEED: SecretKind
SECRET_KIND_MASK_PRIVATE_KEY: SecretKind

class StudyOffer(_message.Message):
    __slots__ = ("study", "status", "local_epochs", "central_dp", "strategy", "secure_aggregation", "is_default")
    STUDY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    CENTRAL_DP_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    IS_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    study: StudyInfo
    status: str
    local_epochs: int
    central_dp: bool
    strategy: str
    secure_aggregation: bool
    is_default: bool
    def __init__(self, study: _Optional[_Union[StudyInfo, _Mapping]] = ..., status: _Optional[str] = ..., local_epochs: _Optional[int] = ..., central_dp: _Optional[bool] = ..., strategy: _Optional[str] = ..., secure_aggregation: _Optional[bool] = ..., is_default: _Optional[bool] = ...) -> None: ...

class ListOpenStudiesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListOpenStudiesResponse(_message.Message):
    __slots__ = ("studies",)
    STUDIES_FIELD_NUMBER: _ClassVar[int]
    studies: _containers.RepeatedCompositeFieldContainer[StudyOffer]
    def __init__(self, studies: _Optional[_Iterable[_Union[StudyOffer, _Mapping]]] = ...) -> None: ...

class DeclineStudyRequest(_message.Message):
    __slots__ = ("study", "institution", "reason", "message")
    STUDY_FIELD_NUMBER: _ClassVar[int]
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    study: str
    institution: str
    reason: str
    message: str
    def __init__(self, study: _Optional[str] = ..., institution: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class DeclineStudyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublishedModel(_message.Message):
    __slots__ = ("study", "version", "sha256", "size_bytes", "model", "round", "contributors", "metrics", "lineage_record", "lineage_signature", "lineage_public_key", "published_at", "federation", "epsilon")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class EpsilonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STUDY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_RECORD_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    study: str
    version: int
    sha256: str
    size_bytes: int
    model: ModelSpec
    round: int
    contributors: _containers.RepeatedScalarFieldContainer[str]
    metrics: _containers.ScalarMap[str, float]
    lineage_record: bytes
    lineage_signature: bytes
    lineage_public_key: bytes
    published_at: float
    federation: str
    epsilon: _containers.ScalarMap[str, float]
    def __init__(self, study: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., round: _Optional[int] = ..., contributors: _Optional[_Iterable[str]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., lineage_record: _Optional[bytes] = ..., lineage_signature: _Optional[bytes] = ..., lineage_public_key: _Optional[bytes] = ..., published_at: _Optional[float] = ..., federation: _Optional[str] = ..., epsilon: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("study",)
    STUDY_FIELD_NUMBER: _ClassVar[int]
    study: str
    def __init__(self, study: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[PublishedModel]
    def __init__(self, models: _Optional[_Iterable[_Union[PublishedModel, _Mapping]]] = ...) -> None: ...

class PullModelRequest(_message.Message):
    __slots__ = ("study", "version", "offset")
    STUDY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    study: str
    version: int
    offset: int
    def __init__(self, study: _Optional[str] = ..., version: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class PullModelResponse(_message.Message):
    __slots__ = ("model", "chunk")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    model: PublishedModel
    chunk: _tensor_pb2.Chunk
    def __init__(self, model: _Optional[_Union[PublishedModel, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("kind", "params")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    params: _struct_pb2.Struct
    def __init__(self, kind: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class StudyInfo(_message.Message):
    __slots__ = ("name", "model", "total_rounds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: ModelSpec
    total_rounds: int
    def __init__(self, name: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., total_rounds: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("institution", "num_train_examples", "client_version", "study")
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    STUDY_FIELD_NUMBER: _ClassVar[int]
    institution: str
    num_train_examples: int
    client_version: str
    study: str
    def __init__(self, institution: _Optional[str] = ..., num_train_examples: _Optional[int] = ..., client_version: _Optional[str] = ..., study: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("session_id", "federation", "study", "heartbeat_interval_seconds", "chunk_bytes", "max_chunk_bytes", "lineage_public_key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    STUDY_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    federation: str
    study: StudyInfo
    heartbeat_interval_seconds: float
    chunk_bytes: int
    max_chunk_bytes: int
    lineage_public_key: bytes
    def __init__(self, session_id: _Optional[str] = ..., federation: _Optional[str] = ..., study: _Optional[_Union[StudyInfo, _Mapping]] = ..., heartbeat_interval_seconds: _Optional[float] = ..., chunk_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., lineage_public_key: _Optional[bytes] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("version", "sha256", "size_bytes", "lineage_record", "lineage_signature")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_RECORD_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    version: int
    sha256: str
    size_bytes: int
    lineage_record: bytes
    lineage_signature: bytes
    def __init__(self, version: _Optional[int] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., lineage_record: _Optional[bytes] = ..., lineage_signature: _Optional[bytes] = ...) -> None: ...

class TrainPlan(_message.Message):
    __slots__ = ("local_epochs", "batch_size", "learning_rate", "optimizer", "momentum", "weight_decay", "proximal_mu")
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    local_epochs: int
    batch_size: int
    learning_rate: float
    optimizer: str
    momentum: float
    weight_decay: float
    proximal_mu: float
    def __init__(self, local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., optimizer: _Optional[str] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., proximal_mu: _Optional[float] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("kind", "round", "nonce", "model", "train", "manifest", "secure_aggregation", "compression")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    kind: TaskKind
    round: int
    nonce: str
    model: ModelRef
    train: TrainPlan
    manifest: _tensor_pb2.ModelManifest
    secure_aggregation: SecAggParams
    compression: Compression
    def __init__(self, kind: _Optional[_Union[TaskKind, str]] = ..., round: _Optional[int] = ..., nonce: _Optional[str] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., train: _Optional[_Union[TrainPlan, _Mapping]] = ..., manifest: _Optional[_Union[_tensor_pb2.ModelManifest, _Mapping]] = ..., secure_aggregation: _Optional[_Union[SecAggParams, _Mapping]] = ..., compression: _Optional[_Union[Compression, _Mapping]] = ...) -> None: ...

class Compression(_message.Message):
    __slots__ = ("method", "block_elements", "topk_fraction")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    TOPK_FRACTION_FIELD_NUMBER: _ClassVar[int]
    method: CompressionMethod
    block_elements: int
    topk_fraction: float
    def __init__(self, method: _Optional[_Union[CompressionMethod, str]] = ..., block_elements: _Optional[int] = ..., topk_fraction: _Optional[float] = ...) -> None: ...

class SecAggParams(_message.Message):
    __slots__ = ("round_id", "participants", "neighbours", "threshold", "bits", "scale", "clipping_range", "distributed_dp", "max_weight", "round")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    CLIPPING_RANGE_FIELD_NUMBER: _ClassVar[int]
    DISTRIBUTED_DP_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round_id: bytes
    participants: _containers.RepeatedScalarFieldContainer[str]
    neighbours: _containers.RepeatedScalarFieldContainer[str]
    threshold: int
    bits: int
    scale: float
    clipping_range: float
    distributed_dp: DistributedDPParams
    max_weight: float
    round: int
    def __init__(self, round_id: _Optional[bytes] = ..., participants: _Optional[_Iterable[str]] = ..., neighbours: _Optional[_Iterable[str]] = ..., threshold: _Optional[int] = ..., bits: _Optional[int] = ..., scale: _Optional[float] = ..., clipping_range: _Optional[float] = ..., distributed_dp: _Optional[_Union[DistributedDPParams, _Mapping]] = ..., max_weight: _Optional[float] = ..., round: _Optional[int] = ...) -> None: ...

class DistributedDPParams(_message.Message):
    __slots__ = ("clip_norm", "l2_bound", "institution_variance")
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    L2_BOUND_FIELD_NUMBER: _ClassVar[int]
    INSTITUTION_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    clip_norm: float
    l2_bound: float
    institution_variance: float
    def __init__(self, clip_norm: _Optional[float] = ..., l2_bound: _Optional[float] = ..., institution_variance: _Optional[float] = ...) -> None: ...

class SecAggPollRequest(_message.Message):
    __slots__ = ("session_id", "round", "nonce", "stage", "wait_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round: int
    nonce: str
    stage: SecAggStage
    wait_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., round: _Optional[int] = ..., nonce: _Optional[str] = ..., stage: _Optional[_Union[SecAggStage, str]] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class SecAggPollResponse(_message.Message):
    __slots__ = ("ready", "peers", "shares", "survivors", "dropped", "signatures")
    READY_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURES_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    peers: _containers.RepeatedCompositeFieldContainer[PeerKeys]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    signatures: _containers.RepeatedCompositeFieldContainer[SurvivorSignature]
    def __init__(self, ready: _Optional[bool] = ..., peers: _Optional[_Iterable[_Union[PeerKeys, _Mapping]]] = ..., shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., signatures: _Optional[_Iterable[_Union[SurvivorSignature, _Mapping]]] = ...) -> None: ...

class PeerKeys(_message.Message):
    __slots__ = ("institution", "cipher_public_key", "mask_public_key", "seed_commitment", "share_commitments", "certificate", "signature")
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SEED_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    SHARE_COMMITMENTS_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    institution: str
    cipher_public_key: bytes
    mask_public_key: bytes
    seed_commitment: bytes
    share_commitments: _containers.RepeatedCompositeFieldContainer[ShareCommitment]
    certificate: bytes
    signature: bytes
    def __init__(self, institution: _Optional[str] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., seed_commitment: _Optional[bytes] = ..., share_commitments: _Optional[_Iterable[_Union[ShareCommitment, _Mapping]]] = ..., certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ShareCommitment(_message.Message):
    __slots__ = ("holder", "self_mask_seed", "mask_private_key")
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SEED_FIELD_NUMBER: _ClassVar[int]
    MASK_PRIVATE_KEY_FIELD_NUMBER: _ClassVar[int]
    holder: str
    self_mask_seed: bytes
    mask_private_key: bytes
    def __init__(self, holder: _Optional[str] = ..., self_mask_seed: _Optional[bytes] = ..., mask_private_key: _Optional[bytes] = ...) -> None: ...

class SurvivorSignature(_message.Message):
    __slots__ = ("institution", "certificate", "signature")
    INSTITUTION_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    institution: str
    certificate: bytes
    signature: bytes
    def __init__(self, institution: _Optional[str] = ..., certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ConsistencyPayload(_message.Message):
    __slots__ = ("certificate", "signature")
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    certificate: bytes
    signature: bytes
    def __init__(self, certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class EncryptedShare(_message.Message):
    __slots__ = ("owner", "holder", "ciphertext")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    owner: str
    holder: str
    ciphertext: bytes
    def __init__(self, owner: _Optional[str] = ..., holder: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("owner", "kind", "share")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    owner: str
    kind: SecretKind
    share: bytes
    def __init__(self, owner: _Optional[str] = ..., kind: _Optional[_Union[SecretKind, str]] = ..., share: _Optional[bytes] = ...) -> None: ...

class SecAggSubmitRequest(_message.Message):
    __slots__ = ("session_id", "round", "nonce", "keys", "shares", "unmask", "consistency")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round: int
    nonce: str
    keys: PeerKeys
    shares: ShareKeysPayload
    unmask: UnmaskPayload
    consistency: ConsistencyPayload
    def __init__(self, session_id: _Optional[str] = ..., round: _Optional[int] = ..., nonce: _Optional[str] = ..., keys: _Optional[_Union[PeerKeys, _Mapping]] = ..., shares: _Optional[_Union[ShareKeysPayload, _Mapping]] = ..., unmask: _Optional[_Union[UnmaskPayload, _Mapping]] = ..., consistency: _Optional[_Union[ConsistencyPayload, _Mapping]] = ...) -> None: ...

class ShareKeysPayload(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[EncryptedShare, _Mapping]]] = ...) -> None: ...

class UnmaskPayload(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, shares: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class SecAggSubmitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PollTaskRequest(_message.Message):
    __slots__ = ("session_id", "wait_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    wait_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class PollTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("session_id", "sha256", "offset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    sha256: str
    offset: int
    def __init__(self, session_id: _Optional[str] = ..., sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class DownloadModelResponse(_message.Message):
    __slots__ = ("chunk", "total_bytes")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    chunk: _tensor_pb2.Chunk
    total_bytes: int
    def __init__(self, chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("session_id", "round", "nonce", "base_version", "manifest", "total_bytes", "sha256", "num_examples", "metrics", "privacy", "encoding")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round: int
    nonce: str
    base_version: int
    manifest: _tensor_pb2.ModelManifest
    total_bytes: int
    sha256: bytes
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    privacy: PrivacySpend
    encoding: Compression
    def __init__(self, session_id: _Optional[str] = ..., round: _Optional[int] = ..., nonce: _Optional[str] = ..., base_version: _Optional[int] = ..., manifest: _Optional[_Union[_tensor_pb2.ModelManifest, _Mapping]] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., privacy: _Optional[_Union[PrivacySpend, _Mapping]] = ..., encoding: _Optional[_Union[Compression, _Mapping]] = ...) -> None: ...

class PrivacySpend(_message.Message):
    __slots__ = ("epsilon", "delta", "budget_epsilon", "noise_multiplier", "sample_rate", "steps", "accountant", "max_grad_norm")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    BUDGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    budget_epsilon: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    max_grad_norm: float
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., budget_epsilon: _Optional[float] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ..., accountant: _Optional[str] = ..., max_grad_norm: _Optional[float] = ...) -> None: ...

class UploadUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: _tensor_pb2.Chunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class UploadUpdateResponse(_message.Message):
    __slots__ = ("bytes_received",)
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    def __init__(self, bytes_received: _Optional[int] = ...) -> None: ...

class ReportEvaluationRequest(_message.Message):
    __slots__ = ("session_id", "round", "nonce", "model_sha256", "num_examples", "loss", "accuracy")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round: int
    nonce: str
    model_sha256: str
    num_examples: int
    loss: float
    accuracy: float
    def __init__(self, session_id: _Optional[str] = ..., round: _Optional[int] = ..., nonce: _Optional[str] = ..., model_sha256: _Optional[str] = ..., num_examples: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ...) -> None: ...

class ReportEvaluationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeclineTaskRequest(_message.Message):
    __slots__ = ("session_id", "round", "nonce", "reason", "message", "privacy")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round: int
    nonce: str
    reason: str
    message: str
    privacy: PrivacySpend
    def __init__(self, session_id: _Optional[str] = ..., round: _Optional[int] = ..., nonce: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., privacy: _Optional[_Union[PrivacySpend, _Mapping]] = ...) -> None: ...

class DeclineTaskResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("lease_seconds",)
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    lease_seconds: float
    def __init__(self, lease_seconds: _Optional[float] = ...) -> None: ...
