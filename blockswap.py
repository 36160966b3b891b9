"""Block swap: run a stack of transformer blocks with most of their weights in host RAM.

Kernel module (style.md §4): imports only torch; attached from outside the model by the node / sampler code.
:func:`plan_block_swap` turns either upstream node's BLOCKSWAPARGS into a :class:`SwapPlan` (pure function);
:meth:`BlockSwapper.attach` applies it to an ``nn.ModuleList``.

Layout (:func:`block_layout`): all parameters and buffers of a block (quantized weights and their scales too) are
packed into one byte range, each tensor row-major contiguous at a 256-byte aligned offset. Swapped blocks' ranges
live in page-locked host memory (one arena, or one buffer per block), resident blocks' in one device buffer each.
A ring of ``prefetch + 1`` device slots receives one copy per swapped block; while a block runs its parameters
are views into its slot (contiguous, aligned by construction), otherwise views into its host range. Weights are
never copied back. On CUDA, a copy into slot s waits for ``s.free`` on its copy stream and records ``s.ready``;
the compute stream waits for ``s.ready`` before the block and records ``s.free`` after it. Slots are freed only
after a device synchronize, so no ``record_stream``; the host never waits in the loop. Copies run ``prefetch``
swapped blocks ahead, cyclically into the next forward. On a CPU target the same logic runs with plain copies.
Inference only; do not ``.to()`` attached blocks (:meth:`BlockSwapper.detach` first).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import types
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

ALIGN = 256
MAX_STREAMS = 16
_HOST_REGISTER_PORTABLE = 1
PLAIN_DEFAULTS = types.MappingProxyType({
    "blocks_to_swap": 20, "offload_img_emb": False, "offload_txt_emb": False, "use_non_blocking": False,
    "vace_blocks_to_swap": 0, "prefetch_blocks": 0, "block_swap_debug": False})
ENHANCED_DEFAULTS = types.MappingProxyType({
    "blocks_to_swap": 0, "enable_cuda_optimization": True, "enable_dram_optimization": True,
    "auto_hardware_tuning": True, "vram_threshold_percent": 50.0, "num_cuda_streams": 8, "bandwidth_target": 0.8,
    "offload_txt_emb": False, "offload_img_emb": False, "vace_blocks_to_swap": 0, "debug_mode": False,
    "block_swap_debug": False})
_ENHANCED_ONLY = frozenset(ENHANCED_DEFAULTS) - frozenset(PLAIN_DEFAULTS)


@dataclass(frozen=True)
class SwapPlan:
    """Which blocks swap and how.

    swapped: block indices streamed from host memory (ascending; upstream swaps the last ``blocks_to_swap``);
    num_blocks: length of the block list the plan was made for; prefetch: swapped blocks copied ahead of use
    (0: each copy is issued right before its block); num_streams: copy streams used round-robin (1..16);
    overlap: copies on dedicated copy streams ordered by events (False: on the compute stream, no overlap);
    single_arena: one page-locked host arena (False: one page-locked buffer per block); debug: log per-forward
    transfer and wait times; offload_txt_emb / offload_img_emb / vace_blocks_to_swap: passed through for the
    caller, which places the non-block modules; weight_vram_bytes: resident blocks plus ring slots.
    """

    swapped: tuple[int, ...]
    num_blocks: int
    prefetch: int = 1
    num_streams: int = 1
    overlap: bool = True
    single_arena: bool = True
    debug: bool = False
    offload_txt_emb: bool = False
    offload_img_emb: bool = False
    vace_blocks_to_swap: int = 0
    weight_vram_bytes: int = 0

    @property
    def ring_slots(self) -> int:
        """Device slots the swapper allocates: prefetch + 1, at most one per swapped block."""
        return min(self.prefetch + 1, len(self.swapped))

    def check(self, num_blocks: int) -> None:
        """Raise ValueError when the plan does not fit a list of ``num_blocks`` blocks or is inconsistent."""
        if num_blocks != self.num_blocks:
            raise ValueError(f"the swap plan was made for {self.num_blocks} blocks, the model has {num_blocks}; "
                             "build the plan from this model's block sizes")
        if list(self.swapped) != sorted(set(self.swapped) & set(range(num_blocks))) or not (
                1 <= self.num_streams <= MAX_STREAMS and self.prefetch >= 0):
            raise ValueError(f"swapped {self.swapped} must be distinct ascending indices < {num_blocks}, "
                             f"num_streams 1..{MAX_STREAMS} (got {self.num_streams}), prefetch >= 0 (got "
                             f"{self.prefetch})")


def _value(args: Mapping[str, Any], defaults: Mapping[str, Any], key: str, lo: float = 0.0,
           hi: float = math.inf) -> Any:
    value, default = args.get(key, defaults[key]), defaults[key]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"block swap argument {key} must be true or false, got {value!r}")
        return value
    kind = int if isinstance(default, int) else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not lo <= value <= hi:
        raise ValueError(f"block swap argument {key} must be a number in [{lo}, {hi}], got {value!r}")
    return value


def _settings(args: Mapping[str, Any]) -> tuple[dict[str, Any], int, bool, float, bool]:
    """Validate a BLOCKSWAPARGS dict of either node: (SwapPlan fields, blocks_to_swap, auto, threshold %,
    enhanced)."""
    enhanced = bool(_ENHANCED_ONLY & set(args))
    defaults = ENHANCED_DEFAULTS if enhanced else PLAIN_DEFAULTS
    unknown = sorted(set(args) - set(defaults))
    if unknown:
        node = "WanVideoEnhancedBlockSwap" if enhanced else "WanVideoBlockSwap"
        raise ValueError(f"unknown block swap arguments {unknown}; a {node} dict takes {sorted(defaults)}")
    fields = {key: _value(args, defaults, key) for key in ("offload_txt_emb", "offload_img_emb",
                                                            "vace_blocks_to_swap", "block_swap_debug")}
    fields["debug"] = fields.pop("block_swap_debug")
    blocks = _value(args, defaults, "blocks_to_swap")
    if not enhanced:
        fields.update(prefetch=_value(args, defaults, "prefetch_blocks"), num_streams=1, single_arena=True,
                      overlap=_value(args, defaults, "use_non_blocking"))
        return fields, blocks, False, 100.0, False
    fields.update(prefetch=math.ceil(1.0 / _value(args, defaults, "bandwidth_target", 1e-3, 1.0) - 1e-9),
                  num_streams=_value(args, defaults, "num_cuda_streams", 1, MAX_STREAMS),
                  overlap=_value(args, defaults, "enable_cuda_optimization"),
                  single_arena=_value(args, defaults, "enable_dram_optimization"),
                  debug=fields["debug"] or _value(args, defaults, "debug_mode"))
    threshold = float(_value(args, defaults, "vram_threshold_percent", 1.0, 100.0))
    return fields, blocks, _value(args, defaults, "auto_hardware_tuning"), threshold, True


def _weight_vram(block_bytes: Sequence[int], count: int, prefetch: int) -> int:
    """Bytes on the device for the first len - count blocks resident plus the ring for the last count."""
    n = len(block_bytes)
    ring = min(prefetch + 1, count) * max(block_bytes[n - count:], default=0)
    return sum(block_bytes[:n - count]) + ring


def _auto_fit(block_bytes: Sequence[int], budget: int, prefetch: int) -> tuple[int, int]:
    """Fewest swapped (last) blocks, then the deepest prefetch <= ``prefetch``, whose weights fit ``budget``."""
    for depth in range(prefetch, -1, -1):
        for count in range(len(block_bytes) + 1):
            if _weight_vram(block_bytes, count, depth) <= budget:
                return count, depth
    smallest = max(block_bytes, default=0)
    raise RuntimeError(f"block swap: not even one block slot ({smallest / 2**20:.0f} MiB) fits the weight budget of "
                       f"{budget / 2**20:.0f} MiB; free VRAM, lower the resolution or frame count (activations), or "
                       "raise vram_threshold_percent")


def plan_block_swap(args: Mapping[str, Any], block_bytes: Sequence[int], free_vram: int,
                    activation_bytes: int) -> SwapPlan:
    """Build a :class:`SwapPlan` from a BLOCKSWAPARGS dict. block_bytes: packed size of each block in execution
    order (:func:`block_nbytes`); free_vram: device bytes free
    for the blocks and activations (after the non-block modules are placed); activation_bytes: peak activation
    size of one forward (e.g. :func:`estimate_activation_bytes`).

    WanVideoBlockSwap: the last ``blocks_to_swap`` blocks swap (clamped to the block count), ``prefetch_blocks``
    deep, copies on a copy stream when ``use_non_blocking`` else on the compute stream. WanVideoEnhancedBlockSwap:
    prefetch depth ceil(1 / bandwidth_target) (a copy may take 1/target of a block's compute time and still arrive
    in time); ``num_cuda_streams`` copy streams; ``enable_cuda_optimization`` copy streams with events, else the
    compute stream; ``enable_dram_optimization`` one host arena. With ``auto_hardware_tuning`` the fewest swapped
    blocks (then the deepest prefetch) whose resident blocks plus ring fit min(vram_threshold_percent of
    free_vram, free_vram - activation_bytes) are chosen; otherwise ``blocks_to_swap`` is used and a weight size over
    that budget is logged as a warning.
    """
    fields, blocks, auto, threshold, enhanced = _settings(args)
    if any(b < 0 for b in block_bytes) or free_vram < 0 or activation_bytes < 0:
        raise ValueError("block sizes, free_vram and activation_bytes must be non-negative byte counts")
    budget = int(min(free_vram * threshold / 100.0, free_vram - activation_bytes))
    if auto:
        count, fields["prefetch"] = _auto_fit(block_bytes, budget, fields["prefetch"])
    else:
        count = min(blocks, len(block_bytes))
    vram = _weight_vram(block_bytes, count, fields["prefetch"])
    if enhanced and not auto and vram > budget:
        log.warning("block swap: weights on the device %.0f MiB exceed the budget %.0f MiB (%.0f%% of %.0f MiB free, "
                    "minus %.0f MiB activations); swap more blocks or enable auto_hardware_tuning", vram / 2**20,
                    budget / 2**20, threshold, free_vram / 2**20, activation_bytes / 2**20)
    n = len(block_bytes)
    return SwapPlan(swapped=tuple(range(n - count, n)), num_blocks=n, weight_vram_bytes=vram, **fields)


def estimate_activation_bytes(tokens: int, dim: int, ffn_dim: int, batch: int = 1, itemsize: int = 2,
                              ffn_chunk: int = 8192) -> int:
    """Rough peak activation bytes of one block forward over ``batch`` x ``tokens`` tokens: the larger of the
    attention phase (six [tokens, dim] tensors of the compute dtype: residual, normed input, q, k, v, output; the
    model's float32 work runs in token chunks) and the FFN phase (three [tokens, dim] tensors plus two
    [ffn_chunk, ffn_dim] hiddens: the model's FFN runs over chunks of ``ffn_chunk`` tokens), times 1.25 for the
    allocator's fragmentation (this estimate at 32760 tokens, dim 5120: 2.34 GiB; the cross-attention runs in
    token chunks and stays below the self-attention phase)."""
    rows = batch * tokens
    attention = 6 * dim * itemsize * rows
    ffn = 3 * dim * itemsize * rows + 2 * ffn_dim * itemsize * min(rows, ffn_chunk)
    return int(1.25 * max(attention, ffn))


@dataclass(frozen=True)
class TensorSpec:
    """One packed tensor: every qualified name bound to it inside the block, its dtype, shape and byte range."""

    names: tuple[str, ...]
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BlockLayout:
    """Packed layout of one block: tensors at 256-byte aligned offsets; ``nbytes`` is a multiple of 256."""

    tensors: tuple[TensorSpec, ...]
    nbytes: int

    @property
    def key(self) -> tuple:
        """Equal for blocks whose tensors share dtypes, shapes and offsets (their slot views can be shared)."""
        return tuple((t.dtype, t.shape, t.offset) for t in self.tensors)


Binding = tuple[nn.Module, str, bool]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _block_tensors(block: nn.Module) -> list[tuple[list[str], list[Binding], torch.Tensor]]:
    """(names, (module, attribute, is_param) bindings, tensor) per distinct tensor, in module order."""
    found: dict[int, tuple[list[str], list[Binding], torch.Tensor]] = {}
    for prefix, module in block.named_modules():
        for is_param, table in ((True, module._parameters), (False, module._buffers)):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                entry = found.setdefault(id(tensor), ([], [], tensor))
                entry[0].append(f"{prefix}.{name}" if prefix else name)
                entry[1].append((module, name, is_param))
    return list(found.values())


def block_layout(block: nn.Module) -> BlockLayout:
    """The packed layout of ``block``'s parameters and buffers (see the module docstring)."""
    specs, offset = [], 0
    for names, bindings, tensor in _block_tensors(block):
        nbytes = tensor.numel() * tensor.element_size()
        specs.append(TensorSpec(tuple(names), bindings[0][2], tensor.dtype, tuple(tensor.shape), offset, nbytes))
        offset = _align(offset + nbytes)
    return BlockLayout(tuple(specs), offset)


def block_nbytes(block: nn.Module) -> int:
    """Bytes one block occupies in the packed layout (host arena and device slot alike)."""
    return block_layout(block).nbytes


def typed_views(buffer: torch.Tensor, layout: BlockLayout) -> list[torch.Tensor]:
    """Views of a uint8 ``buffer`` (>= layout.nbytes, 256-byte aligned) as the layout's tensors, in order."""
    return [buffer[t.offset:t.offset + t.nbytes].view(t.dtype).view(t.shape) for t in layout.tensors]


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8)


def _unregister(ptr: int, keep_alive: torch.Tensor) -> None:  # keep_alive: the storage outlives the registration
    torch.cuda.cudart().cudaHostUnregister(ptr)


class _HostBuffer:
    """A CPU uint8 buffer whose start is 256-byte aligned; ``pin()`` page-locks exactly its bytes."""

    def __init__(self, nbytes: int) -> None:
        raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
        start = (-raw.data_ptr()) % ALIGN
        self.tensor = raw[start:start + nbytes]
        self._finalizer: Optional[weakref.finalize] = None

    def pin(self) -> None:
        """cudaHostRegister the buffer (one registration, no power-of-two rounding); warns and stays pageable
        (copies then stall the host) when the driver refuses."""
        if self.tensor.numel() == 0 or self._finalizer is not None:
            return
        ptr = self.tensor.data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(ptr, self.tensor.numel(), _HOST_REGISTER_PORTABLE)
        if int(err) != 0:
            log.warning("block swap: cudaHostRegister of %.0f MiB failed (%s); host copies stay pageable and "
                        "slower", self.tensor.numel() / 2**20, err)
            return
        self._finalizer = weakref.finalize(self, _unregister, ptr, self.tensor)

    def unpin(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None


@dataclass
class SwapStats:
    """Counters since attach: copies issued, bytes copied, passes (forwards) over the swapped blocks."""

    copies: int = 0
    bytes_copied: int = 0
    passes: int = 0


@dataclass
class _Slot:
    index: int
    buffer: torch.Tensor
    ready: Optional[torch.cuda.Event]
    free: Optional[torch.cuda.Event]
    block: Optional[int] = None
    busy: bool = False


class BlockSwapper:
    """Streams the swapped blocks of a plan through a ring of device slots (see the module docstring).

    Build with :meth:`attach`; end with :meth:`detach`. :meth:`release` frees the slots (after a run or a cancel)
    and keeps the hooks; the next forward allocates them again.
    """

    def __init__(self, blocks: nn.ModuleList, plan: SwapPlan, device: torch.device | str) -> None:
        self.blocks, self.plan, self.device = blocks, plan, torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._cuda = self.device.type == "cuda"
        self._events = self._cuda and plan.overlap
        self._pos = {b: i for i, b in enumerate(plan.swapped)}
        self._layouts: dict[int, BlockLayout] = {}
        self._targets: dict[int, list[tuple[nn.Module, str, bool, int]]] = {}  # (module, name, is_param, tensor)
        self._host_ranges: dict[int, torch.Tensor] = {}  # uint8 range of each swapped block
        self._host_views: dict[int, list[torch.Tensor]] = {}  # its tensors as views of that range
        self._host_buffers: list[_HostBuffer] = []
        self._resident: dict[int, torch.Tensor] = {}  # device buffer of each resident block
        self._slots: list[_Slot] = []
        self._where: dict[int, _Slot] = {}
        self._slot_views: dict[tuple[int, tuple], list[torch.Tensor]] = {}
        self._streams: list[torch.cuda.Stream] = []
        self._next_stream, self._hooks, self._timings = 0, [], []
        self.stats = SwapStats()

    @classmethod
    def attach(cls, blocks: nn.ModuleList, plan: SwapPlan, device: torch.device | str) -> "BlockSwapper":
        """Pack ``blocks`` per ``plan``: swapped blocks into (page-locked, on CUDA) host memory, the others into
        one device buffer each; install forward pre/post hooks on the swapped blocks and prefetch the first ones.
        Blocks may start on any device (not meta). Returns the swapper."""
        plan.check(len(blocks))
        swapper = cls(blocks, plan, device)
        with torch.no_grad(), torch.inference_mode(False):
            for b, block in enumerate(blocks):
                swapper._prepare(b, block)
            swapper._pack_swapped()
            for b in range(len(blocks)):
                if b not in swapper._pos:
                    swapper._resident[b] = swapper._pack(b, swapper._device_buffer(swapper._layouts[b].nbytes))
        for b in plan.swapped:
            swapper._hooks += swapper._make_hooks(b, blocks[b])
        if plan.swapped:
            swapper._fill_ring(plan.swapped[0])
        return swapper

    def _prepare(self, b: int, block: nn.Module) -> None:
        tensors = _block_tensors(block)
        if any(t.is_meta for _, _, t in tensors):
            raise ValueError(f"block {b} has tensors on the meta device; load the weights before attaching")
        self._layouts[b] = block_layout(block)
        self._targets[b] = [(m, name, is_param, i) for i, (_, bindings, _) in enumerate(tensors)
                            for m, name, is_param in bindings]

    def _pack(self, b: int, buffer: torch.Tensor) -> torch.Tensor:
        """Copy block b's tensors into ``buffer`` (uint8, aligned) and rebind them as views of it."""
        if buffer.data_ptr() % ALIGN:
            raise RuntimeError(f"block swap: buffer for block {b} is not {ALIGN}-byte aligned")
        layout, views = self._layouts[b], typed_views(buffer, self._layouts[b])
        current = {i: (m._parameters if p else m._buffers)[name] for m, name, p, i in self._targets[b]}
        for i, spec in enumerate(layout.tensors):
            buffer[spec.offset:spec.offset + spec.nbytes].copy_(_as_bytes(current[i]))
        self._bind(b, views)
        return buffer

    def _pack_swapped(self) -> None:
        swapped = self.plan.swapped
        if self.plan.single_arena and swapped:
            arena = _HostBuffer(sum(self._layouts[b].nbytes for b in swapped))
            self._host_buffers.append(arena)
            offset = 0
            for b in swapped:
                self._host_ranges[b] = arena.tensor[offset:offset + self._layouts[b].nbytes]
                offset += self._layouts[b].nbytes
        else:
            for b in swapped:
                self._host_buffers.append(_HostBuffer(self._layouts[b].nbytes))
                self._host_ranges[b] = self._host_buffers[-1].tensor
        for b in swapped:
            self._pack(b, self._host_ranges[b])
            self._host_views[b] = typed_views(self._host_ranges[b], self._layouts[b])
        if self._cuda:
            for buffer in self._host_buffers:
                buffer.pin()

    def detach(self) -> None:
        """Remove the hooks, free slots and streams, and leave every block's tensors on the CPU (the offload
        device) as contiguous, aligned, unpinned tensors. Swapped blocks keep their host ranges (no copy; the
        tensors of one block, or of the whole arena, share one storage: ``.clone()`` them before saving with
        safetensors); resident blocks are copied to the CPU."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.release()
        for buffer in self._host_buffers:
            buffer.unpin()
        with torch.no_grad(), torch.inference_mode(False):
            for b in list(self._resident):
                self._pack(b, _HostBuffer(self._layouts[b].nbytes).tensor)
        self._resident.clear()
        self._streams = []

    def release(self) -> None:
        """Wait for the device, bind every swapped block to its host range and free the ring slots (call after a
        run or when it is cancelled; the next forward allocates the slots again)."""
        if self._cuda:
            torch.cuda.synchronize(self.device)
        self._flush_timings()
        for b in self.plan.swapped:
            self._bind(b, self._host_views[b])
        self._slots, self._where, self._slot_views = [], {}, {}

    invalidate = release  # forget what the slots hold: call after changing swapped weights in place

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory holding the swapped blocks."""
        return sum(buffer.tensor.numel() for buffer in self._host_buffers)

    @property
    def slot_bytes(self) -> int:
        """Bytes of device memory in ring slots (0 when released)."""
        return sum(slot.buffer.numel() for slot in self._slots)

    def slot_buffers(self) -> list[torch.Tensor]:
        """The ring slots' device buffers (uint8), in slot order."""
        return [slot.buffer for slot in self._slots]

    def host_range(self, b: int) -> torch.Tensor:
        """The host bytes (uint8) of swapped block ``b``."""
        return self._host_ranges[b]

    def _make_hooks(self, b: int, block: nn.Module) -> list[Any]:
        def before(module: nn.Module, args: Any) -> None:
            self._before(b)

        def after(module: nn.Module, args: Any, output: Any) -> None:
            self._after(b)

        return [block.register_forward_pre_hook(torch.compiler.disable(before)),
                block.register_forward_hook(torch.compiler.disable(after), always_call=True)]

    def _upcoming(self, b: int) -> list[int]:
        """b and the next ``prefetch`` swapped blocks in cyclic execution order."""
        order, pos = self.plan.swapped, self._pos[b]
        depth = min(self.plan.prefetch, len(order) - 1)
        return [order[(pos + d) % len(order)] for d in range(depth + 1)]

    def _fill_ring(self, b: int) -> None:
        if not self._slots:
            self._allocate_slots()
        keep = self._upcoming(b)
        for block in keep:
            if block not in self._where:
                self._copy(block, self._victim(keep))

    def _before(self, b: int) -> None:
        if self._pos[b] == 0:
            if self.stats.passes:
                self._flush_timings()
            self.stats.passes += 1
        self._fill_ring(b)
        slot = self._where[b]
        if self._events:
            compute = torch.cuda.current_stream(self.device)
            start = self._mark(compute)
            compute.wait_event(slot.ready)
            if start is not None:
                self._timings.append(("wait", 0, start, self._mark(compute)))
        slot.busy = True
        self._bind(b, self._views_in(slot, b))

    def _after(self, b: int) -> None:
        slot = self._where.get(b)
        if slot is not None and slot.busy:
            if self._events:
                slot.free.record(torch.cuda.current_stream(self.device))
            slot.busy = False
        self._bind(b, self._host_views[b])

    def _victim(self, keep: Sequence[int]) -> _Slot:
        for slot in sorted(self._slots, key=lambda s: s.block is not None):
            if slot.block not in keep:
                return slot
        raise RuntimeError(f"block swap: no free slot among {len(self._slots)} for blocks {list(keep)}")

    def _copy(self, b: int, slot: _Slot) -> None:
        """Copy block b's host range into ``slot`` (one copy) and record when it is ready."""
        if slot.block is not None:
            self._evict(slot)
        src = self._host_ranges[b]
        stream = None
        if self._events:
            stream = self._streams[self._next_stream]
            self._next_stream = (self._next_stream + 1) % len(self._streams)
            stream.wait_event(slot.free)  # readers of the old contents are done
            stream.wait_event(slot.ready)  # and so is an earlier copy into this slot on another stream
        elif self._cuda:
            stream = torch.cuda.current_stream(self.device)
        start = self._mark(stream)
        with torch.cuda.stream(stream) if self._events else contextlib.nullcontext():
            slot.buffer[:src.numel()].copy_(src, non_blocking=self._cuda)
        if self._events:
            slot.ready.record(stream)
        if start is not None:
            self._timings.append(("copy", src.numel(), start, self._mark(stream)))
        slot.block, self._where[b] = b, slot
        self.stats.copies += 1
        self.stats.bytes_copied += src.numel()

    def _evict(self, slot: _Slot) -> None:
        """Drop the slot's block; a block whose forward was interrupted (no post hook ran) is rebound to the
        host, and the slot's free event is re-recorded after all work issued so far."""
        old = slot.block
        del self._where[old]
        if slot.busy:
            if self._events:
                slot.free.record(torch.cuda.current_stream(self.device))
            slot.busy = False
            self._bind(old, self._host_views[old])
        slot.block = None

    def _allocate_slots(self) -> None:
        ring, size = self.plan.ring_slots, max(self._layouts[b].nbytes for b in self.plan.swapped)
        with torch.inference_mode(False):
            storage = self._device_buffer(ring * size)
        events = [(torch.cuda.Event(), torch.cuda.Event()) if self._events else (None, None) for _ in range(ring)]
        self._slots = [_Slot(i, storage[i * size:(i + 1) * size], *events[i]) for i in range(ring)]
        for slot in self._slots if self._events else ():  # the memory may still be in use by earlier kernels
            slot.free.record(torch.cuda.current_stream(self.device))
        if self._events and not self._streams:
            self._streams = [torch.cuda.Stream(self.device) for _ in range(self.plan.num_streams)]

    def _device_buffer(self, nbytes: int) -> torch.Tensor:
        """An uninitialised uint8 buffer on the target device, 256-byte aligned."""
        if not self._cuda:
            return _HostBuffer(nbytes).tensor
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if buffer.data_ptr() % ALIGN:
            raise RuntimeError(f"block swap: a device allocation is not {ALIGN}-byte aligned")
        return buffer

    def _views_in(self, slot: _Slot, b: int) -> list[torch.Tensor]:
        layout = self._layouts[b]
        key = (slot.index, layout.key)
        views = self._slot_views.get(key)
        if views is None:
            with torch.inference_mode(False):
                views = self._slot_views[key] = typed_views(slot.buffer, layout)
        return views

    def _bind(self, b: int, views: Sequence[torch.Tensor]) -> None:
        """Point block ``b``'s parameters and buffers at ``views``. A parameter created under inference mode (ComfyUI
        runs nodes in it) is replaced by a new Parameter: rebinding its ``.data`` to a normal arena view would give
        a half-inference tensor that view ops reject."""
        for module, name, is_param, i in self._targets[b]:
            if not is_param:
                module._buffers[name] = views[i]
            elif module._parameters[name].is_inference():
                module._parameters[name] = nn.Parameter(views[i], requires_grad=False)
            else:
                module._parameters[name].data = views[i]


    def _mark(self, stream: Optional[torch.cuda.Stream]) -> Any:
        """A timestamp for debug timings: an event recorded on ``stream`` (CUDA) or perf_counter; None unless
        debugging."""
        if not self.plan.debug:
            return None
        if stream is None:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def _flush_timings(self) -> None:
        """Log the finished pass's copies and waits (debug only; waits for their events)."""
        if not self._timings:
            return
        for *_, end in self._timings if self._cuda else ():
            end.synchronize()

        def seconds(a: Any, b: Any) -> float:
            return a.elapsed_time(b) / 1e3 if self._cuda else b - a

        copies = [(n, seconds(a, b)) for kind, n, a, b in self._timings if kind == "copy"]
        waits = [seconds(a, b) for kind, _, a, b in self._timings if kind == "wait"]
        copied, copy_s = sum(n for n, _ in copies), sum(s for _, s in copies)
        log.info("block swap pass %d: %d copies, %.1f MiB in %.2f ms of copy time (%.1f GB/s); compute waited "
                 "%.2f ms over %d blocks", self.stats.passes, len(copies), copied / 2**20, copy_s * 1e3,
                 copied / copy_s / 1e9 if copy_s > 0 else 0.0, sum(waits) * 1e3, len(waits))
        self._timings = []
