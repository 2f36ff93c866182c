from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NoneValue(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NONE_VALUE: _ClassVar[NoneValue]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]
    DTYPE_COMPLEX64: _ClassVar[DType]
    DTYPE_COMPLEX128: _ClassVar[DType]
NONE_VALUE: NoneValue
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_BFLOAT16: DType
DTYPE_INT8: DType
DTYPE_INT16: DType
DTYPE_INT32: DType
DTYPE_INT64: DType
DTYPE_UINT8: DType
DTYPE_BOOL: DType
DTYPE_COMPLEX64: DType
DTYPE_COMPLEX128: DType

class Value(_message.Message):
    __slots__ = ("none_value", "bool_value", "int_value", "double_value", "string_value", "bytes_value", "tensor_value", "list_value", "tuple_value", "dict_value", "obj_ref")
    NONE_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BYTES_VALUE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_VALUE_FIELD_NUMBER: _ClassVar[int]
    LIST_VALUE_FIELD_NUMBER: _ClassVar[int]
    TUPLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    DICT_VALUE_FIELD_NUMBER: _ClassVar[int]
    OBJ_REF_FIELD_NUMBER: _ClassVar[int]
    none_value: NoneValue
    bool_value: bool
    int_value: int
    double_value: float
    string_value: str
    bytes_value: bytes
    tensor_value: Tensor
    list_value: ValueList
    tuple_value: ValueList
    dict_value: Dict
    obj_ref: ObjRef
    def __init__(self, none_value: _Optional[_Union[NoneValue, str]] = ..., bool_value: _Optional[bool] = ..., int_value: _Optional[int] = ..., double_value: _Optional[float] = ..., string_value: _Optional[str] = ..., bytes_value: _Optional[bytes] = ..., tensor_value: _Optional[_Union[Tensor, _Mapping]] = ..., list_value: _Optional[_Union[ValueList, _Mapping]] = ..., tuple_value: _Optional[_Union[ValueList, _Mapping]] = ..., dict_value: _Optional[_Union[Dict, _Mapping]] = ..., obj_ref: _Optional[_Union[ObjRef, _Mapping]] = ...) -> None: ...

class ObjRef(_message.Message):
    __slots__ = ("session_id", "obj_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OBJ_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    obj_id: int
    def __init__(self, session_id: _Optional[str] = ..., obj_id: _Optional[int] = ...) -> None: ...

class ValueList(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, items: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class Dict(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[DictEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[DictEntry, _Mapping]]] = ...) -> None: ...

class DictEntry(_message.Message):
    __slots__ = ("string_key", "int_key", "value")
    STRING_KEY_FIELD_NUMBER: _ClassVar[int]
    INT_KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    string_key: str
    int_key: int
    value: Value
    def __init__(self, string_key: _Optional[str] = ..., int_key: _Optional[int] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LoadPackageRequest(_message.Message):
    __slots__ = ("chunk", "server_path")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SERVER_PATH_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    server_path: str
    def __init__(self, chunk: _Optional[bytes] = ..., server_path: _Optional[str] = ...) -> None: ...

class LoadPackageResponse(_message.Message):
    __slots__ = ("package_id", "size_bytes")
    PACKAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    package_id: str
    size_bytes: int
    def __init__(self, package_id: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class LoadPickleRequest(_message.Message):
    __slots__ = ("package_id", "module", "file", "name", "batching", "workers", "worker_slots", "device")
    PACKAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    WORKER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    package_id: str
    module: str
    file: str
    name: str
    batching: Batching
    workers: int
    worker_slots: _containers.RepeatedScalarFieldContainer[int]
    device: str
    def __init__(self, package_id: _Optional[str] = ..., module: _Optional[str] = ..., file: _Optional[str] = ..., name: _Optional[str] = ..., batching: _Optional[_Union[Batching, _Mapping]] = ..., workers: _Optional[int] = ..., worker_slots: _Optional[_Iterable[int]] = ..., device: _Optional[str] = ...) -> None: ...

class Batching(_message.Message):
    __slots__ = ("max_batch_size", "max_queue_delay_ms", "preferred_batch_sizes")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue_delay_ms: float
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue_delay_ms: _Optional[float] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class LoadPickleResponse(_message.Message):
    __slots__ = ("object_id", "name", "version")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    name: str
    version: int
    def __init__(self, object_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class InvokeRequest(_message.Message):
    __slots__ = ("object_id", "method", "args", "kwargs", "version")
    class KwargsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    method: str
    args: _containers.RepeatedCompositeFieldContainer[Value]
    kwargs: _containers.MessageMap[str, Value]
    version: int
    def __init__(self, object_id: _Optional[str] = ..., method: _Optional[str] = ..., args: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., kwargs: _Optional[_Mapping[str, Value]] = ..., version: _Optional[int] = ...) -> None: ...

class InvokeResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: Value
    def __init__(self, result: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class HasAttrRequest(_message.Message):
    __slots__ = ("object_id", "name", "version")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    name: str
    version: int
    def __init__(self, object_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class HasAttrResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: bool
    def __init__(self, present: _Optional[bool] = ...) -> None: ...

class UnloadObjectRequest(_message.Message):
    __slots__ = ("object_id",)
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    def __init__(self, object_id: _Optional[str] = ...) -> None: ...

class UnloadObjectResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnloadPackageRequest(_message.Message):
    __slots__ = ("package_id",)
    PACKAGE_ID_FIELD_NUMBER: _ClassVar[int]
    package_id: str
    def __init__(self, package_id: _Optional[str] = ...) -> None: ...

class UnloadPackageResponse(_message.Message):
    __slots__ = ("object_ids",)
    OBJECT_IDS_FIELD_NUMBER: _ClassVar[int]
    object_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, object_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadResourceRequest(_message.Message):
    __slots__ = ("package_id", "module", "resource")
    PACKAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    package_id: str
    module: str
    resource: str
    def __init__(self, package_id: _Optional[str] = ..., module: _Optional[str] = ..., resource: _Optional[str] = ...) -> None: ...

class LoadTextResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class LoadBinaryResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class RegisterModuleSourceRequest(_message.Message):
    __slots__ = ("name", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    source: str
    def __init__(self, name: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class RegisterModuleSourceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("workers", "packages", "objects", "modules", "queued_calls", "models", "sessions")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    PACKAGES_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_CALLS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    packages: _containers.RepeatedCompositeFieldContainer[PackageStatus]
    objects: _containers.RepeatedCompositeFieldContainer[ObjectStatus]
    modules: _containers.RepeatedScalarFieldContainer[str]
    queued_calls: int
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionStatus]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., packages: _Optional[_Iterable[_Union[PackageStatus, _Mapping]]] = ..., objects: _Optional[_Iterable[_Union[ObjectStatus, _Mapping]]] = ..., modules: _Optional[_Iterable[str]] = ..., queued_calls: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., sessions: _Optional[_Iterable[_Union[SessionStatus, _Mapping]]] = ...) -> None: ...

class SessionStatus(_message.Message):
    __slots__ = ("session_id", "worker", "objects", "idle_seconds", "steps_running")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_FIELD_NUMBER: _ClassVar[int]
    IDLE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    worker: int
    objects: int
    idle_seconds: float
    steps_running: int
    def __init__(self, session_id: _Optional[str] = ..., worker: _Optional[int] = ..., objects: _Optional[int] = ..., idle_seconds: _Optional[float] = ..., steps_running: _Optional[int] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "serving_version", "versions", "error", "worker_slots")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    WORKER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    serving_version: int
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionStatus]
    error: str
    worker_slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., serving_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[ModelVersionStatus, _Mapping]]] = ..., error: _Optional[str] = ..., worker_slots: _Optional[_Iterable[int]] = ...) -> None: ...

class EndpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndpointsResponse(_message.Message):
    __slots__ = ("generation", "workers", "exits")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    EXITS_FIELD_NUMBER: _ClassVar[int]
    generation: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerEndpoint]
    exits: _containers.RepeatedCompositeFieldContainer[WorkerExit]
    def __init__(self, generation: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerEndpoint, _Mapping]]] = ..., exits: _Optional[_Iterable[_Union[WorkerExit, _Mapping]]] = ...) -> None: ...

class WorkerExit(_message.Message):
    __slots__ = ("slot", "pid", "reason", "call_killed_worker", "call_id")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CALL_KILLED_WORKER_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    slot: int
    pid: int
    reason: str
    call_killed_worker: bool
    call_id: int
    def __init__(self, slot: _Optional[int] = ..., pid: _Optional[int] = ..., reason: _Optional[str] = ..., call_killed_worker: _Optional[bool] = ..., call_id: _Optional[int] = ...) -> None: ...

class WorkerEndpoint(_message.Message):
    __slots__ = ("slot", "address", "pid", "generation", "models")
    SLOT_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    slot: int
    address: str
    pid: int
    generation: int
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, slot: _Optional[int] = ..., address: _Optional[str] = ..., pid: _Optional[int] = ..., generation: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("loaded", "swapped", "unloaded", "unchanged", "failed")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    UNLOADED_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    loaded: _containers.RepeatedScalarFieldContainer[str]
    swapped: _containers.RepeatedScalarFieldContainer[str]
    unloaded: _containers.RepeatedScalarFieldContainer[str]
    unchanged: _containers.RepeatedScalarFieldContainer[str]
    failed: _containers.RepeatedCompositeFieldContainer[ModelFailure]
    def __init__(self, loaded: _Optional[_Iterable[str]] = ..., swapped: _Optional[_Iterable[str]] = ..., unloaded: _Optional[_Iterable[str]] = ..., unchanged: _Optional[_Iterable[str]] = ..., failed: _Optional[_Iterable[_Union[ModelFailure, _Mapping]]] = ...) -> None: ...

class ModelFailure(_message.Message):
    __slots__ = ("name", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    error: str
    def __init__(self, name: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ModelVersionStatus(_message.Message):
    __slots__ = ("version", "object_id", "state", "calls_in_flight", "package_id", "module", "file", "batching")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CALLS_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    version: int
    object_id: str
    state: str
    calls_in_flight: int
    package_id: str
    module: str
    file: str
    batching: Batching
    def __init__(self, version: _Optional[int] = ..., object_id: _Optional[str] = ..., state: _Optional[str] = ..., calls_in_flight: _Optional[int] = ..., package_id: _Optional[str] = ..., module: _Optional[str] = ..., file: _Optional[str] = ..., batching: _Optional[_Union[Batching, _Mapping]] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("index", "pid", "state", "calls_served", "restarts", "rss_bytes", "pss_bytes", "shared_bytes", "private_bytes", "last_failure", "gpu", "gpu_memory_bytes", "gpu_utilization_percent")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CALLS_SERVED_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_FAILURE_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    index: int
    pid: int
    state: str
    calls_served: int
    restarts: int
    rss_bytes: int
    pss_bytes: int
    shared_bytes: int
    private_bytes: int
    last_failure: str
    gpu: int
    gpu_memory_bytes: int
    gpu_utilization_percent: float
    def __init__(self, index: _Optional[int] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., calls_served: _Optional[int] = ..., restarts: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., pss_bytes: _Optional[int] = ..., shared_bytes: _Optional[int] = ..., private_bytes: _Optional[int] = ..., last_failure: _Optional[str] = ..., gpu: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ..., gpu_utilization_percent: _Optional[float] = ...) -> None: ...

class PackageStatus(_message.Message):
    __slots__ = ("package_id", "size_bytes")
    PACKAGE_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    package_id: str
    size_bytes: int
    def __init__(self, package_id: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ObjectStatus(_message.Message):
    __slots__ = ("object_id", "package_id", "module", "file", "worker_slots", "device")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_ID_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    WORKER_SLOTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    package_id: str
    module: str
    file: str
    worker_slots: _containers.RepeatedScalarFieldContainer[int]
    device: str
    def __init__(self, object_id: _Optional[str] = ..., package_id: _Optional[str] = ..., module: _Optional[str] = ..., file: _Optional[str] = ..., worker_slots: _Optional[_Iterable[int]] = ..., device: _Optional[str] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("object_id", "version", "package_id", "worker")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    version: int
    package_id: str
    worker: int
    def __init__(self, object_id: _Optional[str] = ..., version: _Optional[int] = ..., package_id: _Optional[str] = ..., worker: _Optional[int] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("session_id", "worker", "worker_pid", "self")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    WORKER_PID_FIELD_NUMBER: _ClassVar[int]
    SELF_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    worker: int
    worker_pid: int
    self: ObjResponse
    def __init__(self_, session_id: _Optional[str] = ..., worker: _Optional[int] = ..., worker_pid: _Optional[int] = ..., self: _Optional[_Union[ObjResponse, _Mapping]] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GlobalRequest(_message.Message):
    __slots__ = ("session_id", "module", "name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODULE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    module: str
    name: str
    def __init__(self, session_id: _Optional[str] = ..., module: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class FromValueRequest(_message.Message):
    __slots__ = ("session_id", "value")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    value: Value
    def __init__(self, session_id: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class FromMovableRequest(_message.Message):
    __slots__ = ("session_id", "object_id", "version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    object_id: str
    version: int
    def __init__(self, session_id: _Optional[str] = ..., object_id: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ObjRequest(_message.Message):
    __slots__ = ("session_id", "obj_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OBJ_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    obj_id: int
    def __init__(self, session_id: _Optional[str] = ..., obj_id: _Optional[int] = ...) -> None: ...

class ObjCallRequest(_message.Message):
    __slots__ = ("session_id", "obj_id", "method", "args", "kwargs")
    class KwargsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OBJ_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    obj_id: int
    method: str
    args: _containers.RepeatedCompositeFieldContainer[Value]
    kwargs: _containers.MessageMap[str, Value]
    def __init__(self, session_id: _Optional[str] = ..., obj_id: _Optional[int] = ..., method: _Optional[str] = ..., args: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., kwargs: _Optional[_Mapping[str, Value]] = ...) -> None: ...

class ObjAttrRequest(_message.Message):
    __slots__ = ("session_id", "obj_id", "name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OBJ_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    obj_id: int
    name: str
    def __init__(self, session_id: _Optional[str] = ..., obj_id: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class ObjResponse(_message.Message):
    __slots__ = ("session_id", "obj_id", "type_name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OBJ_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    obj_id: int
    type_name: str
    def __init__(self, session_id: _Optional[str] = ..., obj_id: _Optional[int] = ..., type_name: _Optional[str] = ...) -> None: ...

class ObjValueResponse(_message.Message):
    __slots__ = ("value",)
    VALUE_FIELD_NUMBER: _ClassVar[int]
    value: Value
    def __init__(self, value: _Optional[_Union[Value, _Mapping]] = ...) -> None: ...

class CreateMovableRequest(_message.Message):
    __slots__ = ("session_id", "obj", "name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OBJ_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    obj: ObjRef
    name: str
    def __init__(self, session_id: _Optional[str] = ..., obj: _Optional[_Union[ObjRef, _Mapping]] = ..., name: _Optional[str] = ...) -> None: ...

class CreateMovableResponse(_message.Message):
    __slots__ = ("object_id", "name", "version", "package_id")
    OBJECT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PACKAGE_ID_FIELD_NUMBER: _ClassVar[int]
    object_id: str
    name: str
    version: int
    package_id: str
    def __init__(self, object_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., package_id: _Optional[str] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("remote_type", "remote_traceback", "call_killed_worker")
    REMOTE_TYPE_FIELD_NUMBER: _ClassVar[int]
    REMOTE_TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    CALL_KILLED_WORKER_FIELD_NUMBER: _ClassVar[int]
    remote_type: str
    remote_traceback: str
    call_killed_worker: bool
    def __init__(self, remote_type: _Optional[str] = ..., remote_traceback: _Optional[str] = ..., call_killed_worker: _Optional[bool] = ...) -> None: ...
