"""What tensorsink knows about the arrays it is given: torch tensors and numpy arrays.

The caller's thread only asks cheap questions here (is it an array, its dtype, its size); the views that
touch data (`host_array`, `byte_view`, `compact_tensor`) run in the workers.
"""

from __future__ import annotations

from typing import TypeAlias, TypeGuard

import numpy as np
import torch
import torch.utils.dlpack

__all__ = [
    "Array",
    "as_array",
    "byte_view",
    "compact_tensor",
    "dtype_name",
    "host_array",
    "is_array",
    "nbytes",
    "numpy_dtype",
    "plain_byte_view",
    "producer_stream",
    "safetensors_dtype",
    "safetensors_tag",
    "torch_dtype",
    "torch_tensor",
]

Array: TypeAlias = "torch.Tensor | np.ndarray"

_TORCH_TO_NUMPY: dict[torch.dtype, np.dtype] = {
    torch.bool: np.dtype(np.bool_),
    torch.uint8: np.dtype(np.uint8),
    torch.int8: np.dtype(np.int8),
    torch.int16: np.dtype(np.int16),
    torch.int32: np.dtype(np.int32),
    torch.int64: np.dtype(np.int64),
    torch.float16: np.dtype(np.float16),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
    torch.complex64: np.dtype(np.complex64),
    torch.complex128: np.dtype(np.complex128),
}
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _TORCH_TO_NUMPY[getattr(torch, _name)] = np.dtype(_name)
_NUMPY_TO_TORCH: dict[np.dtype, torch.dtype] = {v: k for k, v in _TORCH_TO_NUMPY.items()}

_SAFETENSORS_NAMES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "int16": "I16",
    "uint16": "U16",
    "int32": "I32",
    "uint32": "U32",
    "int64": "I64",
    "uint64": "U64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2": "F8_E5M2",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}


_SAFETENSORS_TAGS: dict[torch.dtype, str] = {
    getattr(torch, name): tag for name, tag in _SAFETENSORS_NAMES.items() if hasattr(torch, name)
}


def is_array(value: object) -> TypeGuard[torch.Tensor | np.ndarray]:
    return isinstance(value, (torch.Tensor, np.ndarray))


def as_array(value: object) -> Array | None:
    """`value` as a tensor or array, viewing DLPack and CUDA-array-interface objects without a copy.

    DLPack exporters (CuPy, JAX, ...) order the view after their stream themselves (torch passes its
    current stream to __dlpack__); for __cuda_array_interface__ the stream it names is waited for on
    torch's current stream, as version 3 of that interface asks. A tensor subclass (torchvision's
    tv_tensors, a Parameter) is taken as the plain tensor it holds, with no copy: a .pt of the subclass
    would need its class to load, and `torch.load(weights_only=True)` refuses it. None if `value` is no
    array.
    """
    if type(value) is torch.Tensor or isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        if value.is_nested:  # a jagged tensor's class is its layout, not a wrapper to take off
            return value
        return value.as_subclass(torch.Tensor)
    if hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__"):
        return torch.utils.dlpack.from_dlpack(value)
    interface = getattr(value, "__cuda_array_interface__", None)
    if isinstance(interface, dict):
        tensor = torch.as_tensor(value)  # on the device that holds it
        stream = interface.get("stream")
        if stream:
            torch.cuda.current_stream(tensor.device).wait_stream(producer_stream(stream, tensor.device))
        return tensor
    return None


#: The interface's stream numbers that name no stream object: 1 the legacy default stream (as CuPy and
#: Numba report it), 2 the per-thread default stream.
LEGACY_DEFAULT_STREAM = 1
PER_THREAD_DEFAULT_STREAM = 2


def producer_stream(handle: int, device: torch.device) -> torch.cuda.Stream:
    """The stream a `__cuda_array_interface__` names: 1 is the legacy default stream, which torch calls
    the device's default stream (torch takes odd handles for its own streams, and asserts on
    ExternalStream(1)); any other is an external stream (2, the per-thread default, is one)."""
    if handle == LEGACY_DEFAULT_STREAM:
        return torch.cuda.default_stream(device)
    return torch.cuda.ExternalStream(handle, device=device)  # type: ignore[no-untyped-call]


def plain_byte_view(array: Array, *, native: bool = False) -> memoryview | None:
    """The array's bytes as a flat memoryview where that costs no copy (a C-contiguous host array, no
    autograd, no lazy conjugate or negation; in native byte order if asked), else None."""
    try:
        host = array.numpy() if isinstance(array, torch.Tensor) else array
        if native and not host.dtype.isnative:
            return None
        if host.size == 0:  # no bytes, whatever its strides (a memoryview will not cast a zero shape)
            return memoryview(b"")
        return memoryview(host.data).cast("B")  # TypeError unless C-contiguous
    except (TypeError, RuntimeError, ValueError):  # device, bfloat16, requires_grad, conj, strides
        return None


def dtype_name(array: Array) -> str:
    """The dtype as users know it: "bfloat16", "float32" (torch's spelling for tensors)."""
    if isinstance(array, torch.Tensor):
        return str(array.dtype).removeprefix("torch.")
    return str(array.dtype)


def nbytes(array: Array) -> int:
    """Payload size: numel x element size (what the budget counts), whatever the strides."""
    if isinstance(array, torch.Tensor):
        return array.numel() * array.element_size()
    return int(array.nbytes)


def numpy_dtype(array: Array) -> np.dtype | None:
    """The numpy dtype that holds the array exactly, or None if numpy has none (bfloat16, float8 ...)."""
    if isinstance(array, np.ndarray):
        return None if array.dtype.hasobject else array.dtype
    return _TORCH_TO_NUMPY.get(array.dtype)


def safetensors_dtype(array: Array) -> str | None:
    """The safetensors dtype tag ("F32", "BF16" ...), or None if safetensors cannot store it."""
    return safetensors_tag(array.dtype)


def safetensors_tag(dtype: torch.dtype | np.dtype) -> str | None:
    """safetensors_dtype() for a torch or numpy dtype."""
    if type(dtype) is torch.dtype:  # the common case first: one dictionary lookup
        return _SAFETENSORS_TAGS.get(dtype)
    if isinstance(dtype, np.dtype):
        if dtype.hasobject:
            return None
        found = _NUMPY_TO_TORCH.get(dtype.newbyteorder("="))
        return None if found is None else _SAFETENSORS_TAGS.get(found)
    return _SAFETENSORS_TAGS.get(dtype)


def torch_dtype(array: Array) -> torch.dtype | None:
    """The torch dtype that holds the array exactly, or None (numpy strings, objects, records ...)."""
    if isinstance(array, torch.Tensor):
        return array.dtype
    if array.dtype.hasobject:
        return None
    return _NUMPY_TO_TORCH.get(array.dtype.newbyteorder("="))


def host_array(array: Array, *, native: bool = False) -> np.ndarray:
    """A C-contiguous numpy array with the same values, sharing memory where it can.

    With native=True the byte order is the machine's (safetensors and torch know no other).
    """
    if isinstance(array, torch.Tensor):
        return _plain(array).numpy()
    if native and not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array if array.flags.c_contiguous else np.asarray(array, order="C")


def byte_view(array: Array, *, native: bool = False) -> memoryview:
    """The array's bytes in C order, as a flat memoryview (what os.writev takes without a copy)."""
    if isinstance(array, torch.Tensor) and array.dtype not in _TORCH_TO_NUMPY:
        return _plain(array).reshape(-1).view(torch.uint8).numpy().data
    return host_array(array, native=native).reshape(-1).view(np.uint8).data


def torch_tensor(array: Array) -> torch.Tensor:
    """A CPU tensor with the same values; numpy arrays are wrapped without a copy where torch allows."""
    if isinstance(array, torch.Tensor):
        return array
    host = host_array(array, native=True)
    if not host.flags.writeable:
        host = host.copy()
    return torch.from_numpy(host)


def compact_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor detached and owning only its own bytes, so torch.save does not store a whole batch."""
    tensor = _resolved(tensor)
    if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
        return tensor.clone(memory_format=torch.contiguous_format)
    return tensor


def _resolved(tensor: torch.Tensor) -> torch.Tensor:
    """Detached, with lazy conjugate and negative bits applied (numpy and torch.save see plain values)."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.is_conj() or tensor.is_neg():
        tensor = tensor.resolve_conj().resolve_neg()
    return tensor


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """Resolved and C-contiguous: a tensor whose memory numpy can view as it is.

    torch calls a one-element view contiguous whatever its strides (`x[::4]` of four elements), but
    no byte view of it can be taken: that element is copied.
    """
    tensor = _resolved(tensor)
    if tensor.is_contiguous() and (tensor.numel() != 1 or not tensor.dim() or tensor.stride(-1) == 1):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)
