"""Linear layers per quantization mode (their GEMM calls, with the one ``torch._scaled_mm`` call, in :mod:`quant_gemm`).

The model builds every quantizable Linear through ``ops.Linear(in_features, out_features, bias=True, device=None,
dtype=None)`` where ``ops = ops_for(mode)``; the module type then says what runs. Layers that must stay in high
precision are built with ``ops_for(QuantMode.DISABLED)``.

Forward contract of every Linear: input [..., in_features] (any strides; 3-D CFG batches [B, L, K] included) of the
compute dtype; output [..., out_features] of the input's dtype.

Modes (number formats in :mod:`quant_formats`). ``_fast`` means the GEMM itself runs in low precision; without it
the weight is dequantized on the device right before a GEMM in the compute dtype:

=========================  ==========================================  ===========================================
mode                       weight storage                              GEMM, in order of preference
=========================  ==========================================  ===========================================
disabled                   as given (``CastLinear``)                   ``F.linear`` in the input dtype
fp8_*                      fp8 [N, K] + one per-tensor scale           dequantize -> ``F.linear``
fp8_*_scaled               fp8 [N, K] + per-output-channel scales      dequantize -> ``F.linear``
fp8_*_fast / _scaled_fast  as above                                    fp8 row-wise ``_scaled_mm`` (per-token
                                                                       activation scales), fp8 tensor-wise, dequantize
fp4_scaled                 NVFP4 (4.5 bits/weight)                     dequantize -> ``F.linear``
fp4_scaled_fast            NVFP4                                       native NVFP4 GEMM (sm_100+), NVFP4 -> e4m3 +
                                                                       fp8 row-wise, dequantize
fp4_experimental           MXFP4 (4.25 bits/weight)                    dequantize -> ``F.linear``
=========================  ==========================================  ===========================================

fp8 GEMMs need CUDA compute capability 8.9 or 9.0+. The first preferred kernel that the device supports and that
passes a self-test (one small layer against a float32 reference, once per process, class, device and dtype) is
used; every fallback logs one line. E5M2 weights run the fp8 GEMM after an exact per-call conversion to E4M3
(E5M2 x E5M2 GEMMs do not exist). Stored K and N are padded once at load to multiples of 16 (K to 32 for MXFP4).

Loading. ``load_state_dict`` (strict or not, assign or not) accepts, per layer:

* a high-precision ``weight`` [N, K] (bf16/fp16/fp32): quantized at load. The quantization runs on the device the
  layer lives on (build or move the model to the GPU first for a fast load), or on the incoming tensor's device
  when the layer is on the meta device (then pass ``assign=True``).
* a scaled-fp8 checkpoint's fp8 ``weight`` and ``scale_weight`` (per-tensor [] or [1], or per-channel [N]): taken
  as is by fp8 modes of the same fp8 dtype; other modes re-quantize and then need both in the same call (an
  fp8 weight without its scale raises).
* this module's own ``state_dict`` (padded storage tensors): taken bit-exactly.
* ``scale_input`` is ignored: activation scales are computed per call.

A loader that materialises tensors one by one from a safetensors file can call
``model.load_state_dict({key: tensor}, strict=False)`` per tensor, in any order, and drop each tensor afterwards
(peak memory: one high-precision tensor). An fp8 ``weight`` that arrives alone keeps the layer's current
``scale_weight`` (1.0 after construction); only a mode whose format differs from the checkpoint's fp8 dtype
needs a per-layer dict ``{weight, scale_weight[, bias]}``. Scales are buffers of the same module, so ``.to()``, block swap and
``state_dict`` move them with the weight; dtype conversions (``.half()``, ``.to(torch.bfloat16)``) leave the
weight and scale tensors in their formats and convert only the bias.

``layer_name`` (the class name until :func:`assign_layer_names` or a loader sets it) names the layer in every error.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .compiled_kernels import runs_compiled
from .quant_gemm import QuantizedRows, fp8_rowwise_gemm, gemm_rows, quantize_rows, scaled_mm
from .quant_kernel_choice import select_kernel
from .quant_runtime import current_runtime, report_layout
from .quant_formats import (E4M3, E5M2, MXFP4_BLOCK, NVFP4_BLOCK, GemmOperands, Kernel, check_operands,
                            dequantize_fp8, dequantize_mxfp4, dequantize_nvfp4, e5m2_to_e4m3, nvfp4_to_e4m3,
                            quantize_fp8, quantize_mxfp4, quantize_nvfp4, quantize_nvfp4_activations,
                            quantize_tensor_e4m3, round_up,
                            swizzle_block_scales)

class QuantMode(str, enum.Enum):
    """The loader's ``quantization`` choices, in UI order (upstream's list, then the FP4 ones)."""

    DISABLED = "disabled"
    FP8_E4M3FN = "fp8_e4m3fn"
    FP8_E4M3FN_FAST = "fp8_e4m3fn_fast"
    FP8_E4M3FN_SCALED = "fp8_e4m3fn_scaled"
    FP8_E4M3FN_SCALED_FAST = "fp8_e4m3fn_scaled_fast"
    FP8_E5M2 = "fp8_e5m2"
    FP8_E5M2_FAST = "fp8_e5m2_fast"
    FP8_E5M2_SCALED = "fp8_e5m2_scaled"
    FP8_E5M2_SCALED_FAST = "fp8_e5m2_scaled_fast"
    FP4_EXPERIMENTAL = "fp4_experimental"
    FP4_SCALED = "fp4_scaled"
    FP4_SCALED_FAST = "fp4_scaled_fast"

    @classmethod
    def parse(cls, value: str) -> "QuantMode":
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown quantization {value!r}; choose one of: {choices}") from None


QUANT_MODES = tuple(m.value for m in QuantMode)


def projections(layers: Sequence[nn.Module], x: Union[torch.Tensor, QuantizedRows]) -> Iterator[torch.Tensor]:
    """``layer(x)`` for each of ``layers`` (Linears of one input width: q, k, v), yielded one at a time so the
    caller can consume each output before the next exists. x: [..., K], or the :class:`QuantizedRows` its
    producer made when :func:`takes_quantized_rows`.

    Layers of one class without hooks share work: fp8 row-wise GEMM layers quantize x once for all of them; under
    ``linear_runtime(LinearRuntime(fuse_qkv=True))`` the layers run as one GEMM over their weights concatenated
    along N (one dequantize-and-GEMM for the other kernels), and the outputs are column slices of one
    [..., sum N] tensor. Outputs equal the separate calls within rounding.
    """
    kernel = _fusable_kernel(layers, x)
    fuse = kernel is not None and current_runtime().fuse_qkv
    if kernel is Kernel.FP8_ROWWISE:
        name = "+".join(layer.layer_name for layer in layers)
        a = x if isinstance(x, QuantizedRows) else layers[0]._quantized(gemm_rows(x, name))
        parts = _fused_fp8_rowwise(layers, a, name) if fuse else (layer._run_fp8_rowwise(a) for layer in layers)
    elif fuse:
        rows = x.reshape(-1, x.shape[-1])
        weights = [layer.weight.to(x.dtype) if isinstance(layer, CastLinear) else layer.dequantized_weight(x.dtype)
                   for layer in layers]
        bias = None if layers[0].bias is None else torch.cat([layer.bias.to(x.dtype) for layer in layers])
        parts = F.linear(rows, torch.cat(weights), bias).split([layer.out_features for layer in layers], dim=1)
    else:
        yield from (layer(x) for layer in layers)
        return
    for part in parts:
        yield part.unflatten(0, x.shape[:-1])


def takes_quantized_rows(layers: Sequence[nn.Module], x: torch.Tensor) -> bool:
    """Whether ``layers`` (one Linear, or q/k/v sharing x) run the fp8 row-wise GEMM on x [..., K] with K unpadded,
    so the per-token step producing x may hand them ``quant_gemm.quantized_output(step, ...)`` instead of x: the
    step and the activation quantization become one pass (a ``quant_triton`` kernel on the GPU). False on CUDA
    without generated kernels (there the steps run over token chunks to bound memory)."""
    if x.is_cuda and not runs_compiled(x):
        return False
    return _fusable_kernel(layers, x) is Kernel.FP8_ROWWISE and layers[0].k_pad == layers[0].in_features


def _fusable_kernel(layers: Sequence[nn.Module], x: torch.Tensor) -> Optional[Kernel]:
    """The GEMM ``layers`` can share (one class, one input width, all with or all without bias, no hooks such as
    unmerged LoRAs), or None when they must run one by one."""
    first = layers[0]
    if (len({type(layer) for layer in layers}) != 1 or len({layer.bias is None for layer in layers}) != 1
            or len({layer.in_features for layer in layers}) != 1 or x.shape[-1] != first.in_features
            or any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)):
        return None
    if isinstance(first, CastLinear):
        return Kernel.DENSE
    if isinstance(first, QuantLinear):
        kernel = first.kernel_override or select_kernel(type(first), x.device, x.dtype)
        return kernel if kernel in (Kernel.DENSE, Kernel.FP8_ROWWISE) else None
    return None


def _fused_fp8_rowwise(layers: Sequence["QuantLinear"], a: QuantizedRows, name: str) -> list[torch.Tensor]:
    """One row-wise fp8 GEMM (named ``name`` in errors) for several fp8 layers: their weights [sum n_pad, k_pad] and
    [1, sum n_pad] scales concatenated, over the quantized activations ``a``; returns each layer's
    [M, out_features] (column slices)."""
    operands = [layer._fp8_operands() for layer in layers]
    w8, scale_b = torch.cat([w for w, _ in operands]), torch.cat([scale for _, scale in operands], dim=1)
    biases = [layer._bias_as(a.dtype, padded=True) for layer in layers]
    bias = None if biases[0] is None else torch.cat(biases)
    y = fp8_rowwise_gemm(name, a, w8, scale_b, bias, layers[0].use_fast_accum)
    parts = y.split([layer.n_pad for layer in layers], dim=1)
    return [part[:, :layer.out_features] for part, layer in zip(parts, layers)]


class CastLinear(nn.Linear):
    """Linear whose stored weight dtype may differ from the compute dtype: cast per call to the input's dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.layer_name = type(self).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            report_layout(self.layer_name, x, "F.linear handles it (cuBLAS may copy)")
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, weight, bias)


# ------------------------------------------------------------------------------------------ quantized layers

class QuantLinear(nn.Module):
    """Base of the quantized Linears: padded storage, loading, the forward and the kernels.

    Subclasses define the storage format (``_empty_storage``, ``_quantize``, ``_dequantize_padded`` and, for fp8
    GEMMs, ``_fp8_operands``) and ``kernels``, the GEMMs to try in order.
    """

    mode: ClassVar[QuantMode]
    kernels: ClassVar[tuple[Kernel, ...]] = (Kernel.DENSE,)
    k_block: ClassVar[int] = 16
    required_scales: ClassVar[tuple[str, ...]] = ()
    use_fast_accum: ClassVar[bool] = True  # H100: same error at K = 5120 / 13824, 16-19 % less time

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.n_pad, self.k_pad = round_up(out_features, 16), round_up(in_features, self.k_block)
        self.layer_name = type(self).__name__
        self.kernel_override: Optional[Kernel] = None
        storage = self._empty_storage(torch.device(device) if device is not None else None)
        self.weight = nn.Parameter(storage.pop("weight"), requires_grad=False)
        for name, tensor in storage.items():
            self.register_buffer(name, tensor)
        self.storage_names = ("weight", *storage)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _empty_storage(self, device: Optional[torch.device]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """float32 [n_pad, k_pad] -> storage tensors."""
        raise NotImplementedError

    def _dequantize_padded(self, dtype: torch.dtype) -> torch.Tensor:
        """Storage -> ``dtype`` [n_pad, k_pad]."""
        raise NotImplementedError

    def _fp8_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage -> (e4m3 weight [n_pad, k_pad] contiguous, float32 channel scales [1, n_pad])."""
        raise NotImplementedError(f"{type(self).__name__} has no fp8 GEMM operands")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode.value}, layer_name={self.layer_name!r}")

    # ---------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    scale_weight: Optional[torch.Tensor] = None, layer_name: Optional[str] = None) -> "QuantLinear":
        """Build a layer on ``weight``'s device from a float or fp8 weight [N, K] (+ its ``scale_weight``)."""
        if not weight.is_floating_point():
            raise ValueError(f"from_weight needs a float or fp8 weight [N, K], got {weight.dtype}; load packed "
                             "fp4 tensors with load_state_dict")
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=None if bias is None else bias.dtype)
        if layer_name is not None:
            layer.layer_name = layer_name
        tensors = {"weight": weight, "bias": bias, "scale_weight": scale_weight}
        with torch.no_grad():
            layer._ingest({k: v for k, v in tensors.items() if v is not None}, assign=False)
        return layer

    def load_weight(self, weight: torch.Tensor, scale_weight: Optional[torch.Tensor] = None) -> None:
        """Quantize (or take as is) a float or fp8 weight [N, K] into this layer, e.g. after merging a LoRA."""
        tensors = {"weight": weight} if scale_weight is None else {"weight": weight, "scale_weight": scale_weight}
        with torch.no_grad():
            self._ingest(tensors, assign=False)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer computes with, ``dtype`` [out_features, in_features] contiguous."""
        w = self._dequantize_padded(dtype)
        if w.shape != (self.out_features, self.in_features):
            w = w[:self.out_features, :self.in_features].contiguous()
        return w

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        known = set(self.storage_names) | {"scale_weight", "scale_input"}
        if self.bias is not None:
            known.add("bias")
        incoming = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)
                    and "." not in key[len(prefix):]}
        unexpected_keys.extend(prefix + name for name in incoming if name not in known)
        incoming = {name: value for name, value in incoming.items() if name in known}
        try:
            with torch.no_grad():
                self._ingest(incoming, assign=local_metadata.get("assign_to_params_buffers", False))
        except ValueError as err:
            error_msgs.append(str(err))
        required = ["weight"] + (["bias"] if self.bias is not None else [])
        if "weight" in incoming and incoming["weight"].dtype == self.weight.dtype:
            required += list(self.required_scales)
        missing_keys.extend(prefix + name for name in required if name not in incoming)

    def _ingest(self, tensors: dict[str, torch.Tensor], assign: bool) -> None:
        tensors = dict(tensors)
        tensors.pop("scale_input", None)
        bias, weight = tensors.pop("bias", None), tensors.pop("weight", None)
        if weight is not None and weight.dtype != self.weight.dtype:
            scale = tensors.pop("scale_weight", None)
            if scale is None and weight.dtype in (E4M3, E5M2):
                raise ValueError(f"{self.layer_name}: re-quantizing a {weight.dtype} weight for {self.mode.value} "
                                 "needs its scale_weight in the same load call (torch.ones(()) for an unscaled "
                                 "fp8 checkpoint)")
            self._quantize_into(self._as_float(weight, scale), assign)
        elif weight is not None:
            self._store("weight", weight, assign)
            if "scale_weight" in self.storage_names and "scale_weight" not in tensors and self.scale_weight.is_meta:
                tensors["scale_weight"] = torch.ones((), device=weight.device)
        for name, value in tensors.items():
            if name not in self.storage_names:
                raise ValueError(f"{self.layer_name}: {name} can only be loaded into a {self.mode.value} layer "
                                 "together with its fp8 weight (one load call with weight and scale_weight)")
            self._store(name, value, assign)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"{self.layer_name}.bias: shape {tuple(bias.shape)}, expected ({self.out_features},)")
            self._put("bias", bias.to(self.bias.dtype), assign)

    def _as_float(self, weight: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """A foreign-format weight [N, K] (or padded) times its optional scale -> float32 [N, K] on the compute device."""
        n, k = self.out_features, self.in_features
        if tuple(weight.shape) not in ((n, k), (self.n_pad, self.k_pad)) or not weight.is_floating_point():
            raise ValueError(f"{self.layer_name}.weight: got {tuple(weight.shape)} {weight.dtype}, expected a float "
                             f"or fp8 weight of shape ({n}, {k})")
        device = weight.device if self.weight.is_meta else self.weight.device
        w = weight[:n, :k].to(device=device).float()
        if scale is not None:
            scale = scale.to(device=device, dtype=torch.float32).reshape(-1)
            w = w * (scale[:n, None] if scale.numel() > 1 else scale)
        return w

    def _quantize_into(self, w: torch.Tensor, assign: bool) -> None:
        padded = torch.zeros((self.n_pad, self.k_pad), dtype=torch.float32, device=w.device)
        padded[:w.shape[0], :w.shape[1]] = w
        for name, tensor in self._quantize(padded).items():
            self._store(name, tensor, assign)

    def _store(self, name: str, value: torch.Tensor, assign: bool) -> None:
        """Fit a storage tensor to its padded shape (zero rows/columns; 1.0 for fp8 channel scales) and keep it."""
        current = getattr(self, name)
        if value.dtype == getattr(torch, "float8_e8m0fnu", None) and current.dtype == torch.uint8:
            value = value.view(torch.uint8)
        if value.dtype != current.dtype:
            raise ValueError(f"{self.layer_name}.{name}: dtype {value.dtype}, expected {current.dtype}")
        target = tuple(current.shape)
        if name == "scale_weight":
            value = value.reshape(-1).expand(self.n_pad) if value.numel() == 1 else value.reshape(-1)
        elif value.numel() == 1 and current.numel() == 1:
            value = value.reshape(target)
        if tuple(value.shape) != target:
            if value.dim() != len(target) or any(v > t for v, t in zip(value.shape, target)):
                raise ValueError(f"{self.layer_name}.{name}: shape {tuple(value.shape)} does not fit the stored "
                                 f"shape {target} (in_features={self.in_features}, out_features={self.out_features})")
            fill = torch.ones if name == "scale_weight" else torch.zeros
            fitted = fill(target, dtype=torch.float32, device=value.device).to(value.dtype)
            fitted[tuple(slice(0, s) for s in value.shape)] = value
            value = fitted
        self._put(name, value.contiguous(), assign)

    def _put(self, name: str, value: torch.Tensor, assign: bool) -> None:
        current = getattr(self, name)
        if assign or current.is_meta:
            if name in self._parameters:
                self._parameters[name] = nn.Parameter(value, requires_grad=False)
            else:
                self._buffers[name] = value
        else:
            current.copy_(value)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply to every tensor; dtype conversions skip the weight and scale storage."""
        frozen = {id(getattr(self, name)) for name in self.storage_names}

        def keep_format(tensor: torch.Tensor) -> torch.Tensor:
            out = fn(tensor)
            if id(tensor) in frozen and out.dtype != tensor.dtype:
                return tensor.to(device=out.device)
            return out

        return super()._apply(keep_format, recurse)

    # ---------------------------------------------------------------------------------------------- forward

    def forward(self, x: Union[torch.Tensor, QuantizedRows]) -> torch.Tensor:
        """x [..., in_features] (or the :class:`QuantizedRows` of its producer, see :func:`takes_quantized_rows`)
        -> [..., out_features] of x's dtype."""
        width = self.k_pad if isinstance(x, QuantizedRows) else self.in_features  # quantized rows come padded
        if x.shape[-1] != width:
            raise ValueError(f"{self.layer_name}: input last dim {x.shape[-1]} != {width} (in_features "
                             f"{self.in_features})")
        kernel = self.kernel_override or select_kernel(type(self), x.device, x.dtype)
        if isinstance(x, QuantizedRows):
            if kernel is not Kernel.FP8_ROWWISE:
                raise ValueError(f"{self.layer_name}: got activations quantized by the op that produced them, but "
                                 f"this layer runs {kernel.value}; produce them with takes_quantized_rows first")
            y = self._run_fp8_rowwise(x)
        else:
            y = getattr(self, _RUNNERS[kernel])(gemm_rows(x, self.layer_name))
        return y.reshape(*x.shape[:-1], self.out_features)

    def _quantized(self, rows: torch.Tensor) -> QuantizedRows:
        return quantize_rows(rows, self.k_pad - self.in_features, tuple(rows.shape[:-1]))

    def _bias_as(self, dtype: torch.dtype, padded: bool) -> Optional[torch.Tensor]:
        if self.bias is None:
            return None
        bias = self.bias.to(dtype)
        return F.pad(bias, (0, self.n_pad - self.out_features)) if padded and self.n_pad > self.out_features else bias

    def _crop(self, y: torch.Tensor) -> torch.Tensor:
        return y if y.shape[1] == self.out_features else y[:, :self.out_features]

    def _run_dense(self, rows: torch.Tensor) -> torch.Tensor:
        w, bias = self.dequantized_weight(rows.dtype), self._bias_as(rows.dtype, padded=False)
        check_operands(GemmOperands(self.layer_name, Kernel.DENSE, rows, w.t(), bias=bias, out_dtype=rows.dtype))
        return F.linear(rows, w, bias)

    def _run_fp8_rowwise(self, rows: Union[torch.Tensor, QuantizedRows]) -> torch.Tensor:
        a = rows if isinstance(rows, QuantizedRows) else self._quantized(rows)
        w8, scale_b = self._fp8_operands()
        bias = self._bias_as(a.dtype, padded=True)
        return self._crop(fp8_rowwise_gemm(self.layer_name, a, w8, scale_b, bias, self.use_fast_accum))

    def _run_fp8_tensorwise(self, rows: torch.Tensor) -> torch.Tensor:
        w8, scale_b = self._fp8_operands()
        a, scale_a = quantize_tensor_e4m3(rows, self.k_pad - self.in_features)
        one = torch.ones((), dtype=torch.float32, device=rows.device)
        op = GemmOperands(self.layer_name, Kernel.FP8_TENSORWISE, a, w8.t(), scale_a, one, None, torch.float32)
        y = scaled_mm(op, self.use_fast_accum) * scale_b
        if self.bias is not None:
            y = y + self._bias_as(torch.float32, padded=True)
        return self._crop(y).to(rows.dtype)

    def _run_nvfp4_native(self, rows: torch.Tensor) -> torch.Tensor:
        padded = F.pad(rows, (0, self.k_pad - self.in_features))
        a, a_scale, a_global = quantize_nvfp4_activations(padded)
        op = GemmOperands(self.layer_name, Kernel.NVFP4_NATIVE, a, self.weight.t(), swizzle_block_scales(a_scale),
                          swizzle_block_scales(self.weight_scale), None, rows.dtype)
        y = scaled_mm(op, False) * (a_global * self.weight_scale_2).to(rows.dtype)
        bias = self._bias_as(rows.dtype, padded=True)
        return self._crop(y if bias is None else y + bias)


_RUNNERS = {Kernel.DENSE: "_run_dense", Kernel.FP8_ROWWISE: "_run_fp8_rowwise",
            Kernel.FP8_TENSORWISE: "_run_fp8_tensorwise", Kernel.NVFP4_NATIVE: "_run_nvfp4_native"}


class _FP8Linear(QuantLinear):
    """fp8 weight [n_pad, k_pad] with float32 scales [n_pad] (per-tensor: one value repeated)."""

    fp8_dtype: ClassVar[torch.dtype] = E4M3
    per_channel: ClassVar[bool] = False

    def _empty_storage(self, device: Optional[torch.device]) -> dict[str, torch.Tensor]:
        return {"weight": torch.zeros((self.n_pad, self.k_pad), dtype=self.fp8_dtype, device=device),
                "scale_weight": torch.ones(self.n_pad, dtype=torch.float32, device=device)}

    def _quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = quantize_fp8(w, self.fp8_dtype, self.per_channel)
        return {"weight": q, "scale_weight": scale}

    def _dequantize_padded(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.scale_weight, dtype)

    def _fp8_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fp8_dtype == E4M3:
            return self.weight, self.scale_weight.view(1, -1)
        return e5m2_to_e4m3(self.weight, self.scale_weight)


_FP8_FAST = (Kernel.FP8_ROWWISE, Kernel.FP8_TENSORWISE, Kernel.DENSE)


class FP8E4M3Linear(_FP8Linear):
    mode = QuantMode.FP8_E4M3FN


class FP8E4M3FastLinear(_FP8Linear):
    mode, kernels = QuantMode.FP8_E4M3FN_FAST, _FP8_FAST


class FP8E4M3ScaledLinear(_FP8Linear):
    mode, per_channel = QuantMode.FP8_E4M3FN_SCALED, True


class FP8E4M3ScaledFastLinear(_FP8Linear):
    mode, per_channel, kernels = QuantMode.FP8_E4M3FN_SCALED_FAST, True, _FP8_FAST


class FP8E5M2Linear(_FP8Linear):
    mode, fp8_dtype = QuantMode.FP8_E5M2, E5M2


class FP8E5M2FastLinear(_FP8Linear):
    mode, fp8_dtype, kernels = QuantMode.FP8_E5M2_FAST, E5M2, _FP8_FAST


class FP8E5M2ScaledLinear(_FP8Linear):
    mode, fp8_dtype, per_channel = QuantMode.FP8_E5M2_SCALED, E5M2, True


class FP8E5M2ScaledFastLinear(_FP8Linear):
    mode, fp8_dtype, per_channel, kernels = QuantMode.FP8_E5M2_SCALED_FAST, E5M2, True, _FP8_FAST


class _NVFP4Linear(QuantLinear):
    """NVFP4: packed E2M1 [n_pad, k_pad/2], e4m3 block scales [n_pad, k_pad/16], float32 global scale [1]."""

    required_scales = ("weight_scale", "weight_scale_2")

    def _empty_storage(self, device: Optional[torch.device]) -> dict[str, torch.Tensor]:
        return {"weight": torch.zeros((self.n_pad, self.k_pad // 2), dtype=torch.uint8, device=device),
                "weight_scale": torch.zeros((self.n_pad, self.k_pad // NVFP4_BLOCK), dtype=E4M3, device=device),
                "weight_scale_2": torch.ones(1, dtype=torch.float32, device=device)}

    def _quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, block_scale, global_scale = quantize_nvfp4(w)
        return {"weight": packed, "weight_scale": block_scale, "weight_scale_2": global_scale}

    def _dequantize_padded(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_nvfp4(self.weight, self.weight_scale, self.weight_scale_2, dtype)

    def _fp8_operands(self) -> tuple[torch.Tensor, torch.Tensor]:
        return nvfp4_to_e4m3(self.weight, self.weight_scale, self.weight_scale_2)


class NVFP4Linear(_NVFP4Linear):
    mode = QuantMode.FP4_SCALED


class NVFP4FastLinear(_NVFP4Linear):
    mode, kernels = QuantMode.FP4_SCALED_FAST, (Kernel.NVFP4_NATIVE, Kernel.FP8_ROWWISE, Kernel.DENSE)


class MXFP4Linear(QuantLinear):
    """MXFP4: packed E2M1 [n_pad, k_pad/2], E8M0 block exponents uint8 [n_pad, k_pad/32] (bias 127)."""

    mode, k_block, required_scales = QuantMode.FP4_EXPERIMENTAL, MXFP4_BLOCK, ("weight_scale",)

    def _empty_storage(self, device: Optional[torch.device]) -> dict[str, torch.Tensor]:
        return {"weight": torch.zeros((self.n_pad, self.k_pad // 2), dtype=torch.uint8, device=device),
                "weight_scale": torch.zeros((self.n_pad, self.k_pad // MXFP4_BLOCK), dtype=torch.uint8, device=device)}

    def _quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        packed, exponents = quantize_mxfp4(w)
        return {"weight": packed, "weight_scale": exponents}

    def _dequantize_padded(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_mxfp4(self.weight, self.weight_scale, dtype)


@dataclass(frozen=True)
class Ops:
    """Layer classes for one quantization mode."""

    mode: QuantMode
    Linear: type

    def kernel_for(self, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> Kernel:
        """The GEMM this mode's Linear runs on ``device`` for ``dtype`` inputs (runs the self-tests once)."""
        if not issubclass(self.Linear, QuantLinear):
            return Kernel.DENSE
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return select_kernel(self.Linear, device, dtype)


_LINEARS: dict[QuantMode, type] = {
    QuantMode.DISABLED: CastLinear,
    **{cls.mode: cls for cls in (FP8E4M3Linear, FP8E4M3FastLinear, FP8E4M3ScaledLinear, FP8E4M3ScaledFastLinear,
                                 FP8E5M2Linear, FP8E5M2FastLinear, FP8E5M2ScaledLinear, FP8E5M2ScaledFastLinear,
                                 MXFP4Linear, NVFP4Linear, NVFP4FastLinear)},
}


def ops_for(mode: str | QuantMode) -> Ops:
    """Return the layer namespace for ``mode``."""
    parsed = mode if isinstance(mode, QuantMode) else QuantMode.parse(mode)
    return Ops(mode=parsed, Linear=_LINEARS[parsed])


def assign_layer_names(root: nn.Module) -> None:
    """Set ``layer_name`` of every Linear of this module to its qualified name inside ``root``."""
    for name, module in root.named_modules():
        if isinstance(module, (CastLinear, QuantLinear)):
            module.layer_name = name or type(module).__name__


def bytes_per_weight(layer: nn.Module) -> float:
    """Bytes of weight storage (weight and scales, padding included) per logical weight element."""
    names = getattr(layer, "storage_names", ("weight",))
    total = sum(getattr(layer, name).numel() * getattr(layer, name).element_size() for name in names)
    return total / (layer.in_features * layer.out_features)
