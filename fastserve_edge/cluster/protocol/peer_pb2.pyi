from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PeerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PEER_STATE_UNSPECIFIED: _ClassVar[PeerState]
    PEER_STATE_IDLE: _ClassVar[PeerState]
    PEER_STATE_LOADING: _ClassVar[PeerState]
    PEER_STATE_READY: _ClassVar[PeerState]
    PEER_STATE_SERVING: _ClassVar[PeerState]

class PartKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PART_KIND_UNSPECIFIED: _ClassVar[PartKind]
    PART_KIND_LAYER: _ClassVar[PartKind]
    PART_KIND_EMBEDDING: _ClassVar[PartKind]
    PART_KIND_HEAD: _ClassVar[PartKind]
    PART_KIND_COMMON: _ClassVar[PartKind]
PEER_STATE_UNSPECIFIED: PeerState
PEER_STATE_IDLE: PeerState
PEER_STATE_LOADING: PeerState
PEER_STATE_READY: PeerState
PEER_STATE_SERVING: PeerState
PART_KIND_UNSPECIFIED: PartKind
PART_KIND_LAYER: PartKind
PART_KIND_EMBEDDING: PartKind
PART_KIND_HEAD: PartKind
PART_KIND_COMMON: PartKind

class Profile(_message.Message):
    __slots__ = ("memory_bytes", "decode_gflops", "prefill_gflops", "bandwidth_gbs", "threads")
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DECODE_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_GBS_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    memory_bytes: int
    decode_gflops: float
    prefill_gflops: float
    bandwidth_gbs: float
    threads: int
    def __init__(self, memory_bytes: _Optional[int] = ..., decode_gflops: _Optional[float] = ..., prefill_gflops: _Optional[float] = ..., bandwidth_gbs: _Optional[float] = ..., threads: _Optional[int] = ...) -> None: ...

class Part(_message.Message):
    __slots__ = ("kind", "layer", "slice")
    KIND_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SLICE_FIELD_NUMBER: _ClassVar[int]
    kind: PartKind
    layer: int
    slice: str
    def __init__(self, kind: _Optional[_Union[PartKind, str]] = ..., layer: _Optional[int] = ..., slice: _Optional[str] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("model_digest", "model_name", "layer_start", "layer_end", "has_embedding", "has_head", "host_name")
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    HAS_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    HAS_HEAD_FIELD_NUMBER: _ClassVar[int]
    HOST_NAME_FIELD_NUMBER: _ClassVar[int]
    model_digest: str
    model_name: str
    layer_start: int
    layer_end: int
    has_embedding: bool
    has_head: bool
    host_name: str
    def __init__(self, model_digest: _Optional[str] = ..., model_name: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., has_embedding: _Optional[bool] = ..., has_head: _Optional[bool] = ..., host_name: _Optional[str] = ...) -> None: ...

class CachedModel(_message.Message):
    __slots__ = ("model_digest", "parts")
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    model_digest: str
    parts: _containers.RepeatedCompositeFieldContainer[Part]
    def __init__(self, model_digest: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[Part, _Mapping]]] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("protocol_version", "node_id", "name")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    name: str
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("protocol_version", "node_id", "name", "profile", "state", "stage", "cached", "data_port")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    node_id: str
    name: str
    profile: Profile
    state: PeerState
    stage: StageInfo
    cached: _containers.RepeatedCompositeFieldContainer[CachedModel]
    data_port: int
    def __init__(self, protocol_version: _Optional[int] = ..., node_id: _Optional[str] = ..., name: _Optional[str] = ..., profile: _Optional[_Union[Profile, _Mapping]] = ..., state: _Optional[_Union[PeerState, str]] = ..., stage: _Optional[_Union[StageInfo, _Mapping]] = ..., cached: _Optional[_Iterable[_Union[CachedModel, _Mapping]]] = ..., data_port: _Optional[int] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "sha256", "nbytes", "part")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    nbytes: int
    part: Part
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., nbytes: _Optional[int] = ..., part: _Optional[_Union[Part, _Mapping]] = ...) -> None: ...

class LoadStageRequest(_message.Message):
    __slots__ = ("model_digest", "model_name", "model_config_json", "layer_start", "layer_end", "has_embedding", "has_head", "manifest", "source_address", "ctx", "threads", "host_name", "host_node_id", "tensor")
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    HAS_EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    HAS_HEAD_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CTX_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    HOST_NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    model_digest: str
    model_name: str
    model_config_json: str
    layer_start: int
    layer_end: int
    has_embedding: bool
    has_head: bool
    manifest: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    source_address: str
    ctx: int
    threads: int
    host_name: str
    host_node_id: str
    tensor: TensorPlan
    def __init__(self, model_digest: _Optional[str] = ..., model_name: _Optional[str] = ..., model_config_json: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., has_embedding: _Optional[bool] = ..., has_head: _Optional[bool] = ..., manifest: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., source_address: _Optional[str] = ..., ctx: _Optional[int] = ..., threads: _Optional[int] = ..., host_name: _Optional[str] = ..., host_node_id: _Optional[str] = ..., tensor: _Optional[_Union[TensorPlan, _Mapping]] = ...) -> None: ...

class TensorPlan(_message.Message):
    __slots__ = ("rank", "kv_at", "dim_at", "ffn_at", "vocab_at", "data_addresses", "secret")
    RANK_FIELD_NUMBER: _ClassVar[int]
    KV_AT_FIELD_NUMBER: _ClassVar[int]
    DIM_AT_FIELD_NUMBER: _ClassVar[int]
    FFN_AT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_AT_FIELD_NUMBER: _ClassVar[int]
    DATA_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    rank: int
    kv_at: _containers.RepeatedScalarFieldContainer[int]
    dim_at: _containers.RepeatedScalarFieldContainer[int]
    ffn_at: _containers.RepeatedScalarFieldContainer[int]
    vocab_at: _containers.RepeatedScalarFieldContainer[int]
    data_addresses: _containers.RepeatedScalarFieldContainer[str]
    secret: bytes
    def __init__(self, rank: _Optional[int] = ..., kv_at: _Optional[_Iterable[int]] = ..., dim_at: _Optional[_Iterable[int]] = ..., ffn_at: _Optional[_Iterable[int]] = ..., vocab_at: _Optional[_Iterable[int]] = ..., data_addresses: _Optional[_Iterable[str]] = ..., secret: _Optional[bytes] = ...) -> None: ...

class LoadStageReply(_message.Message):
    __slots__ = ("tensors_cached", "tensors_fetched", "bytes_fetched", "load_seconds")
    TENSORS_CACHED_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FETCHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tensors_cached: int
    tensors_fetched: int
    bytes_fetched: int
    load_seconds: float
    def __init__(self, tensors_cached: _Optional[int] = ..., tensors_fetched: _Optional[int] = ..., bytes_fetched: _Optional[int] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class FetchLayerRequest(_message.Message):
    __slots__ = ("model_digest", "part", "chunk_bytes")
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_digest: str
    part: Part
    chunk_bytes: int
    def __init__(self, model_digest: _Optional[str] = ..., part: _Optional[_Union[Part, _Mapping]] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("index", "offset", "total_bytes", "data", "last")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    index: int
    offset: int
    total_bytes: int
    data: bytes
    last: bool
    def __init__(self, index: _Optional[int] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed", "has_seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPEAT_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPEAT_LAST_N_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repeat_penalty: float
    repeat_last_n: int
    seed: int
    has_seed: bool
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., min_p: _Optional[float] = ..., repeat_penalty: _Optional[float] = ..., repeat_last_n: _Optional[int] = ..., seed: _Optional[int] = ..., has_seed: _Optional[bool] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session", "seq", "pos", "hidden", "tokens", "all_logits", "sample", "sampling", "reset", "logprob", "new_sampler")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    POS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ALL_LOGITS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NEW_SAMPLER_FIELD_NUMBER: _ClassVar[int]
    session: str
    seq: int
    pos: int
    hidden: bytes
    tokens: _containers.RepeatedScalarFieldContainer[int]
    all_logits: bool
    sample: bool
    sampling: Sampling
    reset: bool
    logprob: bool
    new_sampler: bool
    def __init__(self, session: _Optional[str] = ..., seq: _Optional[int] = ..., pos: _Optional[int] = ..., hidden: _Optional[bytes] = ..., tokens: _Optional[_Iterable[int]] = ..., all_logits: _Optional[bool] = ..., sample: _Optional[bool] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., reset: _Optional[bool] = ..., logprob: _Optional[bool] = ..., new_sampler: _Optional[bool] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("session", "seq", "hidden", "token", "logprob", "kv_lost", "seconds")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    KV_LOST_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    session: str
    seq: int
    hidden: bytes
    token: int
    logprob: float
    kv_lost: bool
    seconds: float
    def __init__(self, session: _Optional[str] = ..., seq: _Optional[int] = ..., hidden: _Optional[bytes] = ..., token: _Optional[int] = ..., logprob: _Optional[float] = ..., kv_lost: _Optional[bool] = ..., seconds: _Optional[float] = ...) -> None: ...

class DropSessionRequest(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: str
    def __init__(self, session: _Optional[str] = ...) -> None: ...

class DropSessionReply(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ("echo_bytes",)
    ECHO_BYTES_FIELD_NUMBER: _ClassVar[int]
    echo_bytes: int
    def __init__(self, echo_bytes: _Optional[int] = ...) -> None: ...

class HealthReply(_message.Message):
    __slots__ = ("state", "sessions", "tokens_per_second", "stage", "uptime_seconds", "echo")
    STATE_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ECHO_FIELD_NUMBER: _ClassVar[int]
    state: PeerState
    sessions: int
    tokens_per_second: float
    stage: StageInfo
    uptime_seconds: float
    echo: bytes
    def __init__(self, state: _Optional[_Union[PeerState, str]] = ..., sessions: _Optional[int] = ..., tokens_per_second: _Optional[float] = ..., stage: _Optional[_Union[StageInfo, _Mapping]] = ..., uptime_seconds: _Optional[float] = ..., echo: _Optional[bytes] = ...) -> None: ...
