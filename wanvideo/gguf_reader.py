"""GGUF checkpoints (city96 layout) read tensor by tensor through the ``gguf`` package.

Tensor names are the Wan state-dict keys. GGUF stores dimensions innermost first (``ne[0]`` is the row length), so the
torch shape is the stored dimension list reversed; tensors with more than four dimensions (``patch_embedding.weight``)
are stored flattened and carry their torch shape in the metadata key ``comfy.gguf.orig_shape.<name>``.

Only the header is parsed when a file is opened (``gguf.GGUFReader``); :meth:`GGUFTensorReader.read` reads one
tensor's bytes with ``os.pread`` (nothing stays mapped, so host RSS holds only the tensors kept by the caller) and
dequantizes them with ``gguf.quants.dequantize``: F32 / F16 / BF16 come back in their own dtype, every block format
(Q8_0, Q4_0/1, Q5_0/1, Q2_K..Q6_K, IQ*, ...) as float32. A tensor type the installed ``gguf`` cannot dequantize
(integer types, Q8_1, Q8_K, ...) is rejected when the file is opened, naming the type and the tensor.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import gguf
import numpy as np
import torch

ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
_NATIVE = {gguf.GGMLQuantizationType.F32: torch.float32, gguf.GGMLQuantizationType.F16: torch.float16,
           gguf.GGMLQuantizationType.BF16: torch.bfloat16}


@functools.cache
def can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether the installed ``gguf`` package dequantizes ``qtype`` to floats (probed once per type on one block)."""
    if qtype in _NATIVE:
        return True
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        out = gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, TypeError):
        return False
    return out.dtype == np.float32 and out.shape == (1, block_size)


def read_bytes(path: Path, offset: int, size: int, what: str) -> torch.Tensor:
    """``size`` bytes of ``path`` at ``offset`` in a fresh uint8 CPU tensor, read with ``os.preadv`` (no memory
    mapping: the bytes live only as long as the tensor). ``what`` names the tensor in the error for a short file."""
    raw = torch.empty(size, dtype=torch.uint8)
    view, done = memoryview(raw.numpy()), 0
    with open(path, "rb") as handle:
        while done < size:
            got = os.preadv(handle.fileno(), [view[done:]], offset + done)
            if got <= 0:
                raise ValueError(f"{path}: tensor {what!r}: read {done} of {size} bytes; the file is truncated or "
                                 "damaged — download it again")
            done += got
    return raw


def _field_ints(field) -> tuple[int, ...]:
    return tuple(int(field.parts[i][0]) for i in field.data)


def _field_string(field) -> str:
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


class GGUFTensorReader:
    """One GGUF file: keys, torch shapes and dtypes without reading data; :meth:`read` loads one tensor on the CPU
    (``device`` must be ``cpu``: dequantization runs in numpy)."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        self.path = Path(path)
        if torch.device(device).type != "cpu":
            raise ValueError(f"{self.path}: GGUF files are dequantized on the CPU; open them for device 'cpu' and "
                             f"let the model be moved afterwards (got {device})")
        try:
            self._reader = gguf.GGUFReader(str(self.path), "r")
        except (ValueError, OSError, IndexError) as err:
            raise ValueError(f"{self.path}: not a readable GGUF file ({type(err).__name__}: {err}); the file may be "
                             "truncated or still downloading — download it again") from err
        if self._reader.byte_order != "I":
            raise ValueError(f"{self.path}: big-endian GGUF files are not supported; use a little-endian file")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._shapes = {name: self._torch_shape(t) for name, t in self._tensors.items()}
        self._check_types()
        self._check_size()

    def _torch_shape(self, tensor) -> tuple[int, ...]:
        stored = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        field = self._reader.get_field(ORIG_SHAPE_KEY + tensor.name)
        if field is None:
            return stored
        shape = _field_ints(field)
        if int(np.prod(shape)) != int(np.prod(stored)):
            raise ValueError(f"{self.path}: tensor {tensor.name!r} has {int(np.prod(stored))} elements but its "
                             f"{ORIG_SHAPE_KEY}{tensor.name} metadata says shape {list(shape)}")
        return shape

    def _check_types(self) -> None:
        for name, tensor in self._tensors.items():
            qtype = gguf.GGMLQuantizationType(int(tensor.tensor_type))
            if not can_dequantize(qtype):
                supported = ", ".join(t.name for t in gguf.GGMLQuantizationType if can_dequantize(t))
                raise ValueError(f"{self.path}: tensor {name!r} has GGML type {qtype.name}, which this loader cannot "
                                 f"dequantize (supported: {supported}); use a file with another quantization")

    def _check_size(self) -> None:
        size = self.path.stat().st_size
        for name, tensor in self._tensors.items():
            if tensor.data_offset + tensor.n_bytes > size:
                raise ValueError(f"{self.path}: tensor {name!r} ends at byte {tensor.data_offset + tensor.n_bytes} "
                                 f"but the file has {size} bytes; the file is truncated — download it again")

    def keys(self) -> list[str]:
        """Tensor names as stored in the file."""
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        """Torch shape of one tensor (dimensions reversed from the GGUF order, or the recorded original shape)."""
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        """The dtype :meth:`read` returns: the native dtype for F32/F16/BF16, float32 for block formats."""
        return _NATIVE.get(self.ggml_type(key), torch.float32)

    def ggml_type(self, key: str) -> gguf.GGMLQuantizationType:
        """The tensor's GGML storage type."""
        return gguf.GGMLQuantizationType(int(self._tensors[key].tensor_type))

    def read(self, key: str) -> torch.Tensor:
        """Read and dequantize one tensor: torch shape :meth:`shape`, dtype :meth:`dtype`, CPU, contiguous."""
        tensor = self._tensors[key]
        raw = read_bytes(self.path, int(tensor.data_offset), int(tensor.n_bytes), key)
        qtype = self.ggml_type(key)
        shape = self._shapes[key]
        if qtype in _NATIVE:
            return raw.view(_NATIVE[qtype]).reshape(shape)
        stored = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        blocks = raw.numpy().reshape(gguf.quants.quant_shape_to_byte_shape(stored, qtype))
        return torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).reshape(shape)

    def metadata(self) -> dict[str, str]:
        """The file's string-valued key/value fields (e.g. ``general.architecture``)."""
        out = {}
        for name, field in self._reader.fields.items():
            if field.types == [gguf.GGUFValueType.STRING]:
                out[name] = _field_string(field)
        return out
