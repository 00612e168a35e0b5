"""A stand-in for ``triton_python_backend_utils`` (Triton 2.51 = python_backend r24.10), for unit tests without a
server.

Inside a backend stub, ``triton_python_backend_utils`` is a pure-Python file (``ModelConfig``, the tensor helpers,
the flag constants) onto which the stub sets classes from its C++ module ``c_python_backend_utils``
(``Stub::StubSetup`` in src/pb_stub.cc). This module does the same: it loads the *real* pure-Python file that
nvidia-pytriton ships with its Triton 2.51 (identical to r24.10's src/resources/triton_python_backend_utils.py)
and adds Python versions of the C++ classes that follow the r24.10 sources where our code relies on them:

- ``Tensor``: empty names and unsupported dtypes refused, non-contiguous arrays copied, BYTES serialized at
  construction (src/pb_tensor.cc); ``as_numpy`` gives the array back.
- ``InferenceResponse`` / ``TritonError``: argument types checked as pybind11 would (a plain int is not an error
  code; ``TritonError`` is not an exception). Codes are TRITONSERVER_Error_Code's values.
- ``InferenceResponseSender.send`` (src/response_sender.cc): flags other than 0/FINAL refused, a response needed
  with flags 0, nothing after FINAL, one response only for a non-decoupled model; outputs the client did not
  request are pruned from the response *in place* as the stub does (counted in ``stub_pruned``: on 2.51 that
  pruning frees numpy-backed tensors without the GIL, python_backend #390). Errors raise ``TritonModelException``
  with the real messages.
- BLS ``InferenceRequest.exec`` / ``async_exec``: a test-supplied handler per model name plays the callee
  (``register_model``). What crosses the "wire" is converted as in src/request_executor.cc: BYTES come back as
  object arrays of ``bytes``, an error keeps its text but its code becomes INTERNAL, and a decoupled call gives an
  iterator that ends with an empty final response (what a callee ending with ``send(flags=FINAL)`` produces).
  ``async_exec`` runs ``exec`` in the loop's default executor, like the real one.
- ``Logger`` records (level, message); ``MetricFamily``/``Metric`` keep values with the core's rules (Set only on
  gauges, counters only go up, one description and kind per family name, the same labels share one metric).

Test-only helpers (not in the real module): ``install``, ``reset``, ``register_model``, ``bls_calls``,
``incoming_request``, ``model_config``, ``metric_value``, ``bf16_tensor``, ``Logger.logged``; on requests ``cancel``
and ``cancel_asks``; on senders ``sent``, ``stub_pruned``, ``wait_final`` and ``fail_sends``.
"""

from __future__ import annotations

import asyncio
import enum
import importlib.util
import json
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _real_utils_path() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("nvidia-pytriton (which ships Triton 2.51's triton_python_backend_utils.py) is not installed")
    package = Path(next(iter(spec.submodule_search_locations)))
    path = package / "tritonserver" / "backends" / "python" / "triton_python_backend_utils.py"
    if not path.is_file():
        raise ImportError(f"Triton's triton_python_backend_utils.py is not at {path}")
    return path


def _load_real_utils():
    spec = importlib.util.spec_from_file_location("_triton_python_backend_utils_real", _real_utils_path())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_real = _load_real_utils()

# The pure-Python part, as the stub has it.
TRITON_STRING_TO_NUMPY = _real.TRITON_STRING_TO_NUMPY
serialize_byte_tensor = _real.serialize_byte_tensor
deserialize_bytes_tensor = _real.deserialize_bytes_tensor
get_input_tensor_by_name = _real.get_input_tensor_by_name
get_output_tensor_by_name = _real.get_output_tensor_by_name
get_input_config_by_name = _real.get_input_config_by_name
get_output_config_by_name = _real.get_output_config_by_name
using_decoupled_model_transaction_policy = _real.using_decoupled_model_transaction_policy
triton_to_numpy_type = _real.triton_to_numpy_type
numpy_to_triton_type = _real.numpy_to_triton_type
triton_string_to_numpy = _real.triton_string_to_numpy
ModelConfig = _real.ModelConfig
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = _real.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = _real.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
TRITONSERVER_RESPONSE_COMPLETE_FINAL = _real.TRITONSERVER_RESPONSE_COMPLETE_FINAL
TRITONSERVER_REQUEST_RELEASE_ALL = _real.TRITONSERVER_REQUEST_RELEASE_ALL
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = _real.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE

_FINAL = TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonModelException(Exception):
    """What the stub raises for a PythonBackendException (py::register_exception in pb_stub.cc)."""


# --- errors ------------------------------------------------------------------------------------------------------


class _ErrorCode(enum.IntEnum):
    """TRITONSERVER_Error_Code (core/include/triton/core/tritonserver.h, r24.10)."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7


class TritonError:
    """A response's error. A pybind11 class, not an exception: ``raise TritonError(...)`` is a TypeError there."""

    UNKNOWN = _ErrorCode.UNKNOWN
    INTERNAL = _ErrorCode.INTERNAL
    NOT_FOUND = _ErrorCode.NOT_FOUND
    INVALID_ARG = _ErrorCode.INVALID_ARG
    UNAVAILABLE = _ErrorCode.UNAVAILABLE
    UNSUPPORTED = _ErrorCode.UNSUPPORTED
    ALREADY_EXISTS = _ErrorCode.ALREADY_EXISTS
    CANCELLED = _ErrorCode.CANCELLED

    def __init__(self, message: str, code: _ErrorCode = _ErrorCode.INTERNAL):
        if not isinstance(message, str):
            raise TypeError(f"TritonError(): message must be str, got {type(message).__name__}")
        # py::enum_ without py::arithmetic: a plain int does not convert.
        if not isinstance(code, _ErrorCode):
            raise TypeError(f"TritonError(): code must be a TritonError code, got {code!r}")
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> _ErrorCode:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, {self._code.name})"


# --- tensors and responses ---------------------------------------------------------------------------------------


class Tensor:
    """``pb_utils.Tensor(name, numpy_array)`` on the CPU (src/pb_tensor.cc, PbTensor's numpy constructor)."""

    def __init__(self, name: str, numpy_array: Any):
        if not isinstance(name, str):
            raise TypeError(f"Tensor(): name must be str, got {type(name).__name__}")
        if name == "":
            raise TritonModelException("Tensor name cannot be an empty string.")
        array = np.asarray(numpy_array)  # pybind11's py::array converts sequences the same way
        dtype = numpy_to_triton_type(array.dtype)
        if dtype is None and array.dtype.type is not np.bytes_:
            raise TritonModelException("NumPy dtype is not supported.")
        self._triton_dtype = 13 if dtype is None else dtype
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)
        if self._triton_dtype == 13:
            # What the stub does for BYTES: serialize now, so a bad element fails here, not in send().
            serialize_byte_tensor(array)
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        if self._triton_dtype == _TYPE_BF16:
            raise TritonModelException(
                "Tensor dtype is BF16 and cannot be converted to NumPy. Use to_dlpack() and from_dlpack() instead.")
        return self._array

    def triton_dtype(self) -> int:
        return self._triton_dtype

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={list(self._array.shape)}, dtype={self._array.dtype})"


_TYPE_BF16 = 14  # TRITONSERVER_TYPE_BF16: numpy has no such dtype


def bf16_tensor(name: str, shape: list[int]) -> Tensor:
    """Test side: a BF16 tensor as a client can send one (over gRPC); ``as_numpy()`` raises as the real one does."""
    tensor = Tensor(name, np.zeros(shape, dtype=np.uint16))
    tensor._triton_dtype = _TYPE_BF16
    return tensor


def _over_the_wire(tensor: Tensor) -> Tensor:
    """A tensor as the receiving side of Triton sees it: a copy; BYTES as a C-order object array of ``bytes``."""
    if tensor.triton_dtype() == _TYPE_BF16:
        return tensor
    array = tensor.as_numpy()
    if tensor.triton_dtype() == 13:
        encoded = serialize_byte_tensor(array)
        flat = deserialize_bytes_tensor(encoded) if array.size else np.array([], dtype=np.object_)
        return Tensor(tensor.name(), flat.reshape(array.shape))
    return Tensor(tensor.name(), array.copy())


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None):
        output_tensors = [] if output_tensors is None else output_tensors
        if not isinstance(output_tensors, list | tuple) or not all(isinstance(t, Tensor) for t in output_tensors):
            raise TypeError("InferenceResponse(): output_tensors must be a list of pb_utils.Tensor")
        if error is not None and not isinstance(error, TritonError):
            raise TypeError(f"InferenceResponse(): error must be a pb_utils.TritonError, got {type(error).__name__}")
        self._output_tensors = list(output_tensors)
        self._error = error

    def output_tensors(self) -> list[Tensor]:
        return list(self._output_tensors)  # pybind11 converts the C++ vector into a new list on each call

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def _prune(self, requested: set[str]) -> list[str]:
        """InferResponse::PruneOutputTensors: drop, in place, what was not requested; the names dropped."""
        dropped = [t.name() for t in self._output_tensors if t.name() not in requested]
        self._output_tensors = [t for t in self._output_tensors if t.name() in requested]
        return dropped

    def __repr__(self) -> str:
        return f"InferenceResponse(outputs={[t.name() for t in self._output_tensors]}, error={self._error!r})"


# --- the response sender -----------------------------------------------------------------------------------------


class _Cancel:
    """PbCancel: the one cancellation state a request and its sender share; each ask is a round trip."""

    def __init__(self) -> None:
        self.cancelled = False
        self.asks = 0
        self._lock = threading.Lock()

    def ask(self) -> bool:
        with self._lock:
            self.asks += 1
            return self.cancelled


class InferenceResponseSender:
    """ResponseSender (src/response_sender.cc), delivering to a list instead of the server."""

    def __init__(self, decoupled: bool | None, requested_output_names: set[str], cancel: _Cancel):
        self._decoupled = decoupled  # None: a BLS-made request, which has no decoupled state
        self._requested = set(requested_output_names)
        self._cancel = cancel
        self._lock = threading.Lock()
        self._closed = False
        self._count = 0
        self._final = threading.Event()
        self._send_error: str | None = None
        # Test side: what reached the "server" (after the stub's pruning) and what the stub had to prune.
        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self.stub_pruned: list[str] = []

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if response is not None and not isinstance(response, InferenceResponse):
            raise TypeError(f"send(): response must be a pb_utils.InferenceResponse, got {type(response).__name__}")
        if flags != _FINAL and flags != 0:
            raise TritonModelException("Unable to send response. Unsupported flag provided.")
        if flags == 0 and response is None:
            raise TritonModelException(
                "Inference Response object must be provided when the response flags is set to zero.")
        with self._lock:
            if self._decoupled is None:
                raise TritonModelException(
                    "Unable to send response. Response sender has no reference to the decoupled state of the model.")
            if not self._decoupled:
                if response is not None and self._count > 0:
                    raise TritonModelException(
                        "Unable to send response. Non-decoupled model cannot send more than one response.")
                if response is None and flags == _FINAL and self._count == 0:
                    raise TritonModelException(
                        "Unable to send response. Non-decoupled model cannot send complete final before sending a "
                        "response.")
            if self._closed:
                raise TritonModelException("Unable to send response. Response sender has been closed.")
            if flags == _FINAL:
                self._closed = True
            self._count += 1
            if response is not None:
                self.stub_pruned.extend(response._prune(self._requested))
            if self._send_error is not None:
                # The server answered the send with an error (e.g. the client's stream is gone): the state above
                # has already changed, as in the real sender.
                raise TritonModelException(self._send_error)
            self.sent.append((response, flags))
            if flags == _FINAL:
                self._final.set()

    def is_cancelled(self) -> bool:
        return self._cancel.ask()

    # --- test side ---

    def fail_sends(self, message: str = "An error occurred while sending a response.") -> None:
        """Every later send fails as when the server reports an error for it."""
        self._send_error = message

    def wait_final(self, timeout_s: float = 5.0) -> list[tuple[InferenceResponse | None, int]]:
        """The responses sent, once a FINAL one has been (AssertionError if none comes in time)."""
        if not self._final.wait(timeout_s):
            raise AssertionError(f"no FINAL response within {timeout_s} s; sent so far: {self.sent}")
        with self._lock:
            return list(self.sent)


# --- requests ----------------------------------------------------------------------------------------------------


class InferenceRequest:
    """A request: one a model receives in ``execute`` (see ``incoming_request``) or one it builds for BLS."""

    def __init__(self, request_id: str = "", correlation_id: int | str = 0, inputs: list[Tensor] | None = None,
                 requested_output_names: list[str] | None = None, model_name: str | None = None,
                 model_version: int = -1, flags: int = 0, timeout: int = 0, preferred_memory: Any = None,
                 trace: Any = None, parameters: Mapping[str, bool | int | str] | None = None):
        if inputs is None or requested_output_names is None or model_name is None:
            raise TypeError("InferenceRequest(): inputs, requested_output_names and model_name are required")
        if not all(isinstance(t, Tensor) for t in inputs):
            raise TypeError("InferenceRequest(): inputs must be a list of pb_utils.Tensor")
        if not isinstance(correlation_id, int | str):
            raise TritonModelException("Correlation ID must be integer or string")
        parameters = {} if parameters is None else dict(parameters)
        for key, value in parameters.items():
            if not isinstance(key, str):
                raise TritonModelException(f"Expect parameters keys to have type str, found type {type(key)}")
            if not isinstance(value, bool | int | str):
                raise TritonModelException(
                    f"Expect parameters values to have type bool/int/str, found type {type(value)}")
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._inputs = list(inputs)
        self._requested = set(requested_output_names)
        self._model_name = model_name
        self._model_version = model_version
        self._flags = flags
        self._timeout = timeout
        self._parameters = json.dumps(parameters)
        self._cancel = _Cancel()
        self._sender = InferenceResponseSender(None, self._requested, self._cancel)

    def inputs(self) -> list[Tensor]:
        return list(self._inputs)

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        return self._parameters

    def requested_output_names(self) -> set[str]:
        return set(self._requested)  # a std::set: a Python set

    def get_response_sender(self) -> InferenceResponseSender:
        return self._sender  # the same sender on every call

    def is_cancelled(self) -> bool:
        return self._cancel.ask()

    def exec(self, decoupled: bool = False):
        handler = _models.get(self._model_name)
        callee_request = InferenceRequest(
            request_id=self._request_id, correlation_id=self._correlation_id,
            inputs=[_over_the_wire(t) for t in self._inputs], requested_output_names=sorted(self._requested),
            model_name=self._model_name, model_version=self._model_version, flags=self._flags,
            timeout=self._timeout, parameters=json.loads(self._parameters))
        _bls_calls.append(callee_request)
        if handler is None:
            missing = InferenceResponse(error=TritonError(
                f"Failed for execute the inference request. Model '{self._model_name}' is not ready."))
            return _ResponseIterator([missing]) if decoupled else missing
        result = handler(callee_request)
        if not decoupled:
            if not isinstance(result, InferenceResponse):
                raise TypeError(f"the handler of {self._model_name!r} must return an InferenceResponse")
            return _received(result, self._requested)
        items = [result] if isinstance(result, InferenceResponse) else list(result)
        return _ResponseIterator([_received(r, self._requested) for r in items] + [InferenceResponse()])

    def async_exec(self, decoupled: bool = False):
        loop = asyncio.get_running_loop()  # the real one needs a running loop too
        return loop.run_in_executor(None, self.exec, decoupled)

    # --- test side ---

    def cancel(self) -> None:
        """The client went away: from now on ``is_cancelled()`` (request or sender) answers True."""
        self._cancel.cancelled = True

    @property
    def cancel_asks(self) -> int:
        """How many times the model asked whether this request was cancelled (each a round trip in Triton)."""
        return self._cancel.asks

    @property
    def model_name(self) -> str:
        return self._model_name


def _received(response: InferenceResponse, requested: set[str]) -> InferenceResponse:
    """A callee's response as the BLS caller gets it (InferResponseComplete in src/request_executor.cc)."""
    if response.has_error():
        return InferenceResponse(error=TritonError(response.error().message()))  # the code arrives as INTERNAL
    kept = [t for t in response.output_tensors() if not requested or t.name() in requested]
    return InferenceResponse(output_tensors=[_over_the_wire(t) for t in kept])


class _ResponseIterator:
    """The decoupled BLS iterator (src/pb_response_iterator.cc); a finished one can be iterated again."""

    def __init__(self, responses: list[InferenceResponse]):
        self._responses = responses
        self._index = 0

    def __iter__(self):
        if self._index >= len(self._responses):
            self._index = 0
        return self

    def __next__(self) -> InferenceResponse:
        if self._index >= len(self._responses):
            raise StopIteration
        self._index += 1
        return self._responses[self._index - 1]


# --- logging and metrics -----------------------------------------------------------------------------------------


class Logger:
    class LogLevel(enum.IntEnum):
        INFO = 0
        WARNING = 1
        ERROR = 2
        VERBOSE = 3

    INFO, WARNING, ERROR, VERBOSE = LogLevel.INFO, LogLevel.WARNING, LogLevel.ERROR, LogLevel.VERBOSE

    # Test side: (level name, message) in the order logged.
    messages: list[tuple[str, str]] = []

    @staticmethod
    def log(message: str, level: LogLevel = LogLevel.INFO) -> None:
        Logger.messages.append((Logger.LogLevel(level).name, str(message)))

    @staticmethod
    def log_info(message: str) -> None:
        Logger.log(message, Logger.LogLevel.INFO)

    @staticmethod
    def log_warn(message: str) -> None:
        Logger.log(message, Logger.LogLevel.WARNING)

    @staticmethod
    def log_error(message: str) -> None:
        Logger.log(message, Logger.LogLevel.ERROR)

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger.log(message, Logger.LogLevel.VERBOSE)

    @staticmethod
    def logged(level: str) -> list[str]:
        """Test side: the messages of one level ("INFO", "WARNING", "ERROR", "VERBOSE")."""
        return [message for lvl, message in list(Logger.messages) if lvl == level]


class MetricKind(enum.IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


class Metric:
    def __init__(self, family: MetricFamily, labels: dict[str, str], buckets: list[float] | None):
        self._family = family
        self._key = (family.name, tuple(sorted(labels.items())))
        self._buckets = buckets
        _metric_values.setdefault(self._key, 0.0)

    def increment(self, value: float) -> None:
        kind = self._family.kind
        if kind == MetricKind.HISTOGRAM:
            raise TritonModelException("TRITONSERVER_METRIC_KIND_HISTOGRAM does not support Increment")
        if kind == MetricKind.COUNTER and value < 0:
            raise TritonModelException(
                "TRITONSERVER_METRIC_KIND_COUNTER can only be incremented monotonically by non-negative values.")
        with _metrics_lock:
            _metric_values[self._key] += float(value)

    def set(self, value: float) -> None:
        if self._family.kind != MetricKind.GAUGE:
            raise TritonModelException(f"TRITONSERVER_METRIC_KIND_{self._family.kind.name} does not support Set")
        with _metrics_lock:
            _metric_values[self._key] = float(value)

    def observe(self, value: float) -> None:
        if self._family.kind != MetricKind.HISTOGRAM:
            raise TritonModelException(f"TRITONSERVER_METRIC_KIND_{self._family.kind.name} does not support Observe")
        with _metrics_lock:
            _metric_values[self._key] += float(value)  # the sum; enough for what tests read

    def value(self) -> float:
        if self._family.kind == MetricKind.HISTOGRAM:
            raise TritonModelException("TRITONSERVER_METRIC_KIND_HISTOGRAM does not support Value")
        with _metrics_lock:
            return _metric_values[self._key]


class MetricFamily:
    COUNTER = MetricKind.COUNTER
    GAUGE = MetricKind.GAUGE
    HISTOGRAM = MetricKind.HISTOGRAM

    def __init__(self, name: str, description: str, kind: MetricKind):
        if not isinstance(kind, MetricKind):
            raise TypeError(f"MetricFamily(): kind must be a MetricFamily kind, got {kind!r}")
        with _metrics_lock:
            known = _metric_families.get(name)
            if known is not None and known != (description, kind):
                # prometheus-cpp refuses a second family of one name with other help or type.
                raise TritonModelException(
                    f"Failed to create metric family: {name!r} exists with description {known[0]!r} and kind "
                    f"{known[1].name}")
            _metric_families[name] = (description, kind)
        self.name = name
        self.description = description
        self.kind = kind

    def Metric(self, labels: dict[str, str] | None = None, buckets: list[float] | None = None) -> Metric:  # noqa: N802
        if labels is not None and not isinstance(labels, dict):
            raise TritonModelException("Failed to create metric. Labels must be a dictionary.")
        if buckets is not None:
            if not isinstance(buckets, list):
                raise TritonModelException("Failed to create metric. Buckets must be a list.")
            if self.kind != MetricKind.HISTOGRAM:
                raise TritonModelException("Failed to create metric. Unexpected buckets found.")
        elif self.kind == MetricKind.HISTOGRAM:
            raise TritonModelException("Failed to create metric. Missing required buckets.")
        return Metric(self, {str(k): str(v) for k, v in (labels or {}).items()}, buckets)


_metrics_lock = threading.Lock()
_metric_families: dict[str, tuple[str, MetricKind]] = {}
_metric_values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}


def metric_value(name: str, labels: Mapping[str, str]) -> float | None:
    """Test side: a metric's value as the metrics endpoint would show it; None if it was never created."""
    with _metrics_lock:
        return _metric_values.get((name, tuple(sorted((str(k), str(v)) for k, v in labels.items()))))


# --- the test side: installing, models for BLS, requests as the server delivers them -----------------------------

_models: dict[str, Callable[[InferenceRequest], InferenceResponse | Iterable[InferenceResponse]]] = {}
_bls_calls: list[InferenceRequest] = []


def register_model(name: str, handler: Callable[[InferenceRequest], Any] | None) -> None:
    """Play model ``name`` for BLS calls: ``handler(request)`` returns its InferenceResponse, or for a decoupled
    call its responses (the fake ends them with the empty final response). None removes the model."""
    if handler is None:
        _models.pop(name, None)
    else:
        _models[name] = handler


def bls_calls() -> list[InferenceRequest]:
    """The requests BLS calls delivered to the registered models, in order (as the callee saw them)."""
    return list(_bls_calls)


def incoming_request(inputs: Mapping[str, Any] | Iterable[Tensor], requested_output_names: Iterable[str] = (),
                     decoupled: bool = True, model_name: str = "model", request_id: str = "") -> InferenceRequest:
    """A request as Triton hands it to ``execute``: the tensors have crossed the wire (BYTES → ``bytes``), the
    response sender knows whether the model is decoupled. A client that lists no outputs gets all of them; Triton
    then fills in every output name, so pass them all to model that case faithfully."""
    tensors = [Tensor(name, value) for name, value in inputs.items()] if isinstance(inputs, Mapping) else list(inputs)
    request = InferenceRequest(request_id=request_id, inputs=[_over_the_wire(t) for t in tensors],
                               requested_output_names=list(requested_output_names), model_name=model_name)
    request._sender = InferenceResponseSender(decoupled, request._requested, request._cancel)
    return request


def model_config(name: str = "model", max_batch_size: int = 0, inputs: list[dict[str, Any]] | None = None,
                 outputs: list[dict[str, Any]] | None = None, **fields: Any) -> ModelConfig:
    """The ModelConfig ``auto_complete_config`` receives: config.pbtxt as JSON, with the lists Triton fills in."""
    config = {"name": name, "backend": "python", "max_batch_size": max_batch_size, "input": inputs or [],
              "output": outputs or [], **fields}
    return ModelConfig(json.dumps(config))


def reset() -> None:
    """Forget logs, metrics, registered models and BLS calls (between tests)."""
    Logger.messages.clear()
    with _metrics_lock:
        _metric_families.clear()
        _metric_values.clear()
    _models.clear()
    _bls_calls.clear()


def install():
    """Make ``import triton_python_backend_utils`` give this module; returns it."""
    module = sys.modules[__name__]
    present = sys.modules.get("triton_python_backend_utils")
    if present is not None and present is not module:
        raise RuntimeError(f"another triton_python_backend_utils is installed already: {present!r}")
    sys.modules["triton_python_backend_utils"] = module
    return module
