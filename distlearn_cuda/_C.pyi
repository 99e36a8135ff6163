# The extension's interface (csrc/bindings.cpp), for type checkers: what the
# CPU and the CUDA flavors define (the CUDA ops and the NCCL communicator
# exist only where has_cuda and has_nccl say). tests/test_typing.py checks
# these names against the built module's.

from collections.abc import Iterable, Iterator, Sequence

kSegmentAlign: int
kLaunchCapacity: int
kLaunchCapacityPaired: int
kChunkElements: int
has_cuda: bool
has_nccl: bool
nccl_abi_version: int | None
cuda_archs: str

class Layout:
    def __init__(
        self, numels: Sequence[int], dtypes: Sequence[int], buffer_dtype: int, count_slots: int
    ) -> None: ...
    @property
    def num_tensors(self) -> int: ...
    @property
    def offsets(self) -> list[int]: ...
    @property
    def numels(self) -> list[int]: ...
    @property
    def count_offset(self) -> int: ...
    @property
    def count_slots(self) -> int: ...
    @property
    def flag_offset(self) -> int: ...
    @property
    def buffer_numel(self) -> int: ...

class Addresses:
    def __init__(self, addresses: Iterable[int] = ...) -> None: ...
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> int: ...
    def __iter__(self) -> Iterator[int]: ...

def pack(
    layout: Layout, tensors: Addresses | list[int], buffer: int, count_slot: int, num_threads: int
) -> None: ...
def unpack(
    layout: Layout,
    tensors: Addresses | list[int],
    buffer: int,
    normalize: bool,
    num_threads: int,
    skip_nonfinite: bool = False,
    agree_slots: int = 0,
    agree_first: int = 0,
    agree_count: int = 0,
) -> None: ...
def ea_blend(
    layout: Layout,
    params: Addresses | list[int],
    centers: Addresses | list[int],
    buffer: int,
    alpha: float,
    count_slot: int,
    num_threads: int,
    catch_up: bool = False,
) -> None: ...
def center_update(
    layout: Layout,
    centers: Addresses | list[int],
    buffer: int,
    num_threads: int,
    skip_nonfinite: bool = False,
) -> None: ...
def outer_gradient(
    layout: Layout,
    locals: Addresses | list[int],
    globals: Addresses | list[int],
    buffer: int,
    count_slot: int,
    num_threads: int,
) -> None: ...
def outer_step(
    layout: Layout,
    locals: Addresses | list[int],
    globals: Addresses | list[int],
    momenta: Addresses | list[int],
    buffer: int,
    lr: float,
    momentum: float,
    nesterov: bool,
    mix: float,
    num_threads: int,
    skip_nonfinite: bool = False,
) -> None: ...
def quantize_blocks(
    format: int, values: int, n: int, block: int, codes: int, scales: int
) -> None: ...
def dequantize_blocks(
    format: int, codes: int, scales: int, n: int, block: int, out: int
) -> None: ...

class LowBitShape:
    def __init__(self, format: int, block: int, blocks_per_shard: int, world: int) -> None: ...
    @property
    def shard(self) -> int: ...
    @property
    def message_bytes(self) -> int: ...

def low_bit_encode(
    shape: LowBitShape,
    values: int,
    residual: int,
    next_residual: int,
    n: int,
    messages: int,
    num_threads: int,
) -> None: ...
def low_bit_sum(shape: LowBitShape, received: int, summed: int, num_threads: int) -> None: ...
def low_bit_decode(
    shape: LowBitShape, gathered: int, n: int, values: int, num_threads: int
) -> None: ...

# The CUDA flavor.
def cuda_build_version() -> int: ...
def pack_cuda(
    layout: Layout, tensors: Addresses | list[int], buffer: int, count_slot: int, stream: int
) -> None: ...
def unpack_cuda(
    layout: Layout,
    tensors: Addresses | list[int],
    buffer: int,
    normalize: bool,
    stream: int,
    skip_nonfinite: bool = False,
    agree_slots: int = 0,
    agree_first: int = 0,
    agree_count: int = 0,
) -> None: ...
def ea_blend_cuda(
    layout: Layout,
    params: Addresses | list[int],
    centers: Addresses | list[int],
    buffer: int,
    alpha: float,
    count_slot: int,
    stream: int,
    catch_up: bool = False,
) -> None: ...
def center_update_cuda(
    layout: Layout,
    centers: Addresses | list[int],
    buffer: int,
    stream: int,
    skip_nonfinite: bool = False,
) -> None: ...
def outer_gradient_cuda(
    layout: Layout,
    locals: Addresses | list[int],
    globals: Addresses | list[int],
    buffer: int,
    count_slot: int,
    stream: int,
) -> None: ...
def outer_step_cuda(
    layout: Layout,
    locals: Addresses | list[int],
    globals: Addresses | list[int],
    momenta: Addresses | list[int],
    buffer: int,
    lr: float,
    momentum: float,
    nesterov: bool,
    mix: float,
    stream: int,
    skip_nonfinite: bool = False,
) -> None: ...
def low_bit_encode_cuda(
    shape: LowBitShape,
    values: int,
    residual: int,
    next_residual: int,
    n: int,
    messages: int,
    stream: int,
) -> None: ...
def low_bit_sum_cuda(shape: LowBitShape, received: int, summed: int, stream: int) -> None: ...
def low_bit_decode_cuda(
    shape: LowBitShape, gathered: int, n: int, values: int, stream: int
) -> None: ...

# The NCCL communicator (has_nccl).
def nccl_load(candidates: Sequence[str]) -> tuple[int, str]: ...
def nccl_loaded() -> tuple[int, str] | None: ...
def nccl_error_string(code: int) -> str: ...

class NcclCommunicator:
    def __init__(
        self, unique_id: bytes, nranks: int, rank: int, device: int, init_timeout: float
    ) -> None: ...
    @staticmethod
    def unique_id() -> bytes: ...
    def all_reduce_sum(
        self, buffer: int, count: int, dtype: int, stream: int, timeout: float
    ) -> None: ...
    def all_to_all(self, send: int, recv: int, bytes: int, stream: int, timeout: float) -> None: ...
    def all_gather(self, send: int, recv: int, bytes: int, stream: int, timeout: float) -> None: ...
    def broadcast(
        self, buffer: int, count: int, dtype: int, root: int, stream: int, timeout: float
    ) -> None: ...
    def check(self) -> None: ...
    def abort(self) -> None: ...
    def close(self, timeout: float = 0.0) -> str: ...
    def keep_for_shrink(self) -> None: ...
    def shrink(self, excluded: Sequence[int], init_timeout: float) -> NcclCommunicator: ...
    @property
    def can_shrink(self) -> bool: ...
    @property
    def revoked(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def usable(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def enqueues_in_progress(self) -> int: ...
    @property
    def nonblocking(self) -> bool: ...
    @property
    def rank(self) -> int: ...
    @property
    def nranks(self) -> int: ...
    @property
    def device(self) -> int: ...
