"""Plans: the flat buffer and layout for one list of tensors, made once and reused.

A Plan owns a ``_C.Layout`` (where each tensor lives in the buffer), the
buffer itself, and the kernels its fused ops run, chosen once for its
device: the extension's CPU or CUDA ones (when it was built with CUDA), or
``reference``'s for devices it was built without.

CUDA ops are enqueued on the current stream of the plan's device and never
wait for the device; any list of addresses costs the same (new gradients
after ``zero_grad(set_to_none=True)`` included) and a CUDA graph captures
the launches whole (NOTE [Kernel parameters], kernels/multi_tensor_engine.h).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple

import torch

from .. import _C, reference
from .._native import DTYPE_CODES, current_stream_handle
from .layouts import segment_view
from .validate import EXACT_INTEGER_LIMIT, Signature

Tensors = Sequence[torch.Tensor]


class Blend(NamedTuple):
    """An EA blend's arguments, as the kernels take them."""

    params: Tensors
    param_addresses: _C.Addresses
    centers: Tensors
    center_addresses: _C.Addresses
    alpha: float
    slot: int
    catch_up: bool


class OuterStep(NamedTuple):
    """A DiLoCo outer step's tensors and settings, as the kernels take them
    (see ``kernels/element_ops.h``, ``outer_step_element``)."""

    locals_: Tensors
    local_addresses: _C.Addresses
    globals_: Tensors
    global_addresses: _C.Addresses
    momenta: Tensors
    momentum_addresses: _C.Addresses
    lr: float
    momentum: float
    nesterov: bool
    mix: float
    skip_nonfinite: bool


# Tensor addresses as the ops take them: a list, or an _C.Addresses made
# once from one (no conversion per call: the hot paths keep theirs).
Addresses = list[int] | _C.Addresses


def as_addresses(addresses: Addresses) -> _C.Addresses:
    """An _C.Addresses: made here from a list (pybind's implicit conversion
    tries the other constructors first, which costs several times more)."""
    return addresses if type(addresses) is _C.Addresses else _C.Addresses(addresses)


def count_slots_for(world_size: int, buffer_dtype: torch.dtype) -> int:
    """Count slots so that no slot ever sums more ones than the dtype holds exactly.

    Rank r writes its 1 into slot r % slots, so a slot receives at most
    ceil(world_size / slots) ones: one slot for fp32 up to 2^24 ranks, more
    for 16-bit buffers on large worlds.
    """
    return max(1, math.ceil(world_size / EXACT_INTEGER_LIMIT[buffer_dtype]))


def lossless_dtype(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    """Smallest supported dtype that holds every value of every dtype exactly."""
    promoted = dtypes[0]
    for dtype in dtypes[1:]:
        promoted = torch.promote_types(promoted, dtype)
    return promoted


class Plan:
    """Layout, buffer and fused ops for tensors of one signature.

    The count slots come in ``codes`` groups of ``slots_per_code`` (see
    ``count_slots_for``, and the note "Call codes" in ``_tensors.agreement``): a
    rank writes its 1 into ``count_slot(rank, code)``. Each tensor's segment
    holds its elements in the memory order its signature entry names (see
    the note "Segment order" in ``_tensors.layouts``)."""

    def __init__(
        self,
        signature: Signature,
        buffer_dtype: torch.dtype,
        slots_per_code: int,
        codes: int = 1,
    ) -> None:
        device, entries = signature
        dtypes = [entry[0] for entry in entries]
        numels = [math.prod(entry[1]) for entry in entries]
        self.dtypes = dtypes  # each tensor's own (its segment holds it in the buffer's)
        self.shapes = [entry[1] for entry in entries]
        self.strides = [entry[2] for entry in entries]
        self.codes = codes
        self.slots_per_code = slots_per_code
        self.layout = _C.Layout(
            numels,
            [DTYPE_CODES[d] for d in dtypes],
            DTYPE_CODES[buffer_dtype],
            codes * slots_per_code,
        )
        # Zeros: padding between segments is never written and must stay 0.
        self.buffer = torch.zeros(self.layout.buffer_numel, dtype=buffer_dtype, device=device)
        self._address = self.buffer.data_ptr()
        self._offsets = self.layout.offsets
        self._counts = self.buffer[
            self.layout.count_offset : self.layout.count_offset + self.layout.count_slots
        ]
        self._flag = self.buffer[self.layout.flag_offset]
        # The kernels serving the device, chosen once (see _kernels_for).
        self._kernels = _kernels_for(device)
        self.on_cuda = device.type == "cuda"
        # The stream of the last launch, as its handle (compared every call)
        # and as torch's object (to wait on when the next call's differs).
        self._last_handle: int | None = None
        self._last_stream: torch.cuda.Stream | None = None

    @property
    def count_slots(self) -> int:
        return self.layout.count_slots

    def count_slot(self, rank: int, code: int = 0) -> int:
        """The slot rank ``rank`` writes its 1 into for ``code``."""
        return code * self.slots_per_code + rank % self.slots_per_code

    def code_slots(self, code: int) -> tuple[int, int]:
        """(first, count) of the count slots of ``code``."""
        return code * self.slots_per_code, self.slots_per_code

    def code_counts(self) -> list[int]:
        """After an allreduce, how many ranks wrote each code (reads the
        device: on a GPU, not for the hot path)."""
        slots = self._counts.tolist()
        per = self.slots_per_code
        if per == 1:
            return [round(v) for v in slots]
        return [round(sum(slots[c * per : (c + 1) * per])) for c in range(self.codes)]

    def holds_everyone(self, code: int) -> bool:
        """After an allreduce, whether every contributor wrote ``code`` (reads
        the device: on a GPU, not for the hot path; see ``_tensors.agreement``)."""
        slots = self._counts.tolist()
        first, count = self.code_slots(code)
        return sum(slots[first : first + count]) == sum(slots)

    def contributor_count(self) -> int:
        """Sum of the count slots (reads the device: not for the hot path)."""
        return round(float(self._counts.double().sum()))

    def segment(self, index: int) -> torch.Tensor:
        """Tensor ``index``'s segment of the buffer, a view in its shape and
        memory order."""
        return segment_view(
            self.buffer, self._offsets[index], self.shapes[index], self.strides[index]
        )

    def nonfinite_ranks(self) -> int:
        """After an allreduce, how many ranks packed a NaN or an infinity
        (reads the device: not for the hot path)."""
        return round(float(self._flag))

    def pack(self, tensors: Sequence[torch.Tensor], addresses: Addresses, count_slot: int) -> None:
        self._kernels.pack(self, tensors, as_addresses(addresses), count_slot)

    def unpack(
        self,
        tensors: Sequence[torch.Tensor],
        addresses: Addresses,
        normalize: bool,
        skip_nonfinite: bool = False,
        agreement: tuple[Plan, int] | None = None,
    ) -> None:
        """``agreement``: (a plan of the same count slots, a code): zeros
        instead unless every contributor wrote that code into its slots (the
        step's decision, read on the device; see ``_tensors.agreement``)."""
        self._kernels.unpack(
            self, tensors, as_addresses(addresses), normalize, skip_nonfinite, agreement
        )

    def ea_blend(
        self,
        params: Sequence[torch.Tensor],
        param_addresses: Addresses,
        centers: Sequence[torch.Tensor],
        center_addresses: Addresses,
        alpha: float,
        count_slot: int,
        catch_up: bool = False,
    ) -> None:
        """The EA blend; with ``catch_up``, first centers += the buffer (the
        previous round's allreduced sum), in the same pass."""
        blend = Blend(
            params,
            as_addresses(param_addresses),
            centers,
            as_addresses(center_addresses),
            alpha,
            count_slot,
            catch_up,
        )
        self._kernels.ea_blend(self, blend)

    def center_update(
        self,
        centers: Sequence[torch.Tensor],
        center_addresses: Addresses,
        skip_nonfinite: bool = False,
    ) -> None:
        self._kernels.center_update(self, centers, as_addresses(center_addresses), skip_nonfinite)

    def outer_gradient(
        self,
        locals_: Sequence[torch.Tensor],
        local_addresses: Addresses,
        globals_: Sequence[torch.Tensor],
        global_addresses: Addresses,
        count_slot: int,
    ) -> None:
        """buffer <- globals - locals (DiLoCo's outer gradient); count slots
        and flag as ``pack``."""
        self._kernels.outer_gradient(
            self,
            locals_,
            as_addresses(local_addresses),
            globals_,
            as_addresses(global_addresses),
            count_slot,
        )

    def outer_step(self, step: OuterStep) -> None:
        """The outer step from the allreduced buffer (see ``OuterStep``)."""
        self._kernels.outer_step(self, step)

    def agreement_args(self, agreement: tuple[Plan, int] | None) -> tuple[int, int, int]:
        """(the decision plan's count slots' address, first, count), or zeros."""
        if agreement is None:
            return (0, 0, 0)
        decision, code = agreement
        return (decision._counts.data_ptr(), *decision.code_slots(code))

    def _count_args(self) -> tuple[int, int]:
        return self.layout.count_offset, self.layout.count_slots

    @property
    def _flag_at(self) -> int:
        return self.layout.flag_offset

    def _on_device(self) -> AbstractContextManager[object]:
        """Makes the plan's device current when it is not (launches go to the current device)."""
        index = self.buffer.device.index
        if torch.cuda.current_device() == index:
            return nullcontext()
        return torch.cuda.device(index)

    def _stream(self) -> int:
        """The current stream, made to wait for the previous call's stream when they differ,
        so the buffer is never written while another stream may still read it.

        Not while capturing a CUDA graph: a capturing stream cannot wait on
        work outside the capture, and torch's capture recipe (warm up on a
        side stream, then synchronize) has ordered it already.
        """
        index = self.buffer.get_device()
        handle = current_stream_handle(index)
        if handle != self._last_handle:
            stream = torch.cuda.current_stream(index)
            if self._last_stream is not None and not torch.cuda.is_current_stream_capturing():
                stream.wait_stream(self._last_stream)
            self._last_handle, self._last_stream = handle, stream
        return handle


class _ExtensionKernels:
    """The extension's kernels: its CPU or its CUDA ones, called alike but
    for the resource argument, torch's intra-op thread count (CPU) or the
    current stream of the plan's device (CUDA, launched with that device
    current)."""

    def __init__(self, cuda: bool) -> None:
        suffix = "_cuda" if cuda else ""
        self._cuda = cuda
        self._pack = getattr(_C, "pack" + suffix)
        self._unpack = getattr(_C, "unpack" + suffix)
        self._ea_blend = getattr(_C, "ea_blend" + suffix)
        self._center_update = getattr(_C, "center_update" + suffix)
        self._outer_gradient = getattr(_C, "outer_gradient" + suffix)
        self._outer_step = getattr(_C, "outer_step" + suffix)

    def _launch(self, plan: Plan, kernel: Any, *args: Any, then: tuple[Any, ...] = ()) -> None:
        """``kernel(plan.layout, *args, resource, *then)``."""
        if self._cuda:
            with plan._on_device():
                kernel(plan.layout, *args, plan._stream(), *then)
        else:
            kernel(plan.layout, *args, torch.get_num_threads(), *then)

    def pack(self, plan: Plan, tensors: Tensors, addresses: _C.Addresses, slot: int) -> None:
        self._launch(plan, self._pack, addresses, plan._address, slot)

    def unpack(
        self,
        plan: Plan,
        tensors: Tensors,
        addresses: _C.Addresses,
        normalize: bool,
        skip_nonfinite: bool,
        agreement: tuple[Plan, int] | None,
    ) -> None:
        self._launch(
            plan,
            self._unpack,
            addresses,
            plan._address,
            normalize,
            then=(skip_nonfinite, *plan.agreement_args(agreement)),
        )

    def ea_blend(self, plan: Plan, blend: Blend) -> None:
        self._launch(
            plan,
            self._ea_blend,
            blend.param_addresses,
            blend.center_addresses,
            plan._address,
            blend.alpha,
            blend.slot,
            then=(blend.catch_up,),
        )

    def center_update(
        self, plan: Plan, centers: Tensors, addresses: _C.Addresses, skip_nonfinite: bool
    ) -> None:
        self._launch(plan, self._center_update, addresses, plan._address, then=(skip_nonfinite,))

    def outer_gradient(
        self,
        plan: Plan,
        locals_: Tensors,
        local_addresses: _C.Addresses,
        globals_: Tensors,
        global_addresses: _C.Addresses,
        slot: int,
    ) -> None:
        self._launch(
            plan, self._outer_gradient, local_addresses, global_addresses, plan._address, slot
        )

    def outer_step(self, plan: Plan, step: OuterStep) -> None:
        self._launch(
            plan,
            self._outer_step,
            step.local_addresses,
            step.global_addresses,
            step.momentum_addresses,
            plan._address,
            step.lr,
            step.momentum,
            step.nesterov,
            step.mix,
            then=(step.skip_nonfinite,),
        )


class _ReferenceKernels:
    """``reference``'s ops, one tensor at a time, for a device the extension
    has no kernels for."""

    @staticmethod
    def pack(plan: Plan, tensors: Tensors, addresses: _C.Addresses, slot: int) -> None:
        reference.pack(
            tensors, plan.buffer, plan._offsets, *plan._count_args(), slot, plan._flag_at
        )

    @staticmethod
    def unpack(
        plan: Plan,
        tensors: Tensors,
        addresses: _C.Addresses,
        normalize: bool,
        skip_nonfinite: bool,
        agreement: tuple[Plan, int] | None,
    ) -> None:
        agree = None
        if agreement is not None:
            agree = (agreement[0]._counts, *plan.agreement_args(agreement)[1:])
        reference.unpack(
            tensors,
            plan.buffer,
            plan._offsets,
            *plan._count_args(),
            normalize,
            plan._flag_at,
            skip_nonfinite,
            agree,
        )

    @staticmethod
    def ea_blend(plan: Plan, blend: Blend) -> None:
        reference.ea_blend(
            blend.params,
            blend.centers,
            plan.buffer,
            plan._offsets,
            blend.alpha,
            *plan._count_args(),
            blend.slot,
            plan._flag_at,
            blend.catch_up,
        )

    @staticmethod
    def center_update(
        plan: Plan, centers: Tensors, addresses: _C.Addresses, skip_nonfinite: bool
    ) -> None:
        reference.center_update(centers, plan.buffer, plan._offsets, plan._flag_at, skip_nonfinite)

    @staticmethod
    def outer_gradient(
        plan: Plan,
        locals_: Tensors,
        local_addresses: _C.Addresses,
        globals_: Tensors,
        global_addresses: _C.Addresses,
        slot: int,
    ) -> None:
        reference.outer_gradient(
            locals_, globals_, plan.buffer, plan._offsets, *plan._count_args(), slot, plan._flag_at
        )

    @staticmethod
    def outer_step(plan: Plan, step: OuterStep) -> None:
        reference.outer_step(
            step.locals_,
            step.globals_,
            step.momenta,
            plan.buffer,
            plan._offsets,
            *plan._count_args(),
            step.lr,
            step.momentum,
            step.nesterov,
            step.mix,
            plan._flag_at,
            step.skip_nonfinite,
        )


_CPU_KERNELS = _ExtensionKernels(cuda=False)
_CUDA_KERNELS = _ExtensionKernels(cuda=True) if _C.has_cuda else None


def _kernels_for(device: torch.device) -> _ExtensionKernels | type[_ReferenceKernels]:
    """Which kernels serve a device: the extension's CPU or CUDA ones, or the reference."""
    if device.type == "cpu":
        return _CPU_KERNELS
    if device.type == "cuda" and _CUDA_KERNELS is not None:
        return _CUDA_KERNELS
    return _ReferenceKernels


class PlanCache:
    """Plans by (purpose, signature, buffer dtype, codes); count slots follow
    from the world size. Plans of different purposes never share a buffer:
    a synchronization's plan is never a gradient plan, whose buffer may be
    the gradients themselves (flat storage, bucket views)."""

    def __init__(self, world_size: int) -> None:
        self._world_size = world_size
        self._plans: dict[tuple[str, Signature, torch.dtype, int], Plan] = {}

    def get(
        self, purpose: str, signature: Signature, buffer_dtype: torch.dtype, codes: int = 1
    ) -> Plan:
        key = (purpose, signature, buffer_dtype, codes)
        plan = self._plans.get(key)
        if plan is None:
            slots = count_slots_for(self._world_size, buffer_dtype)
            plan = self._plans[key] = Plan(signature, buffer_dtype, slots, codes)
        return plan
