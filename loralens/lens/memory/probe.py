"""A CPU memory probe: live bytes of the tensor storages that torch ops allocate, and their peak.

Used by tests (planned vs measured memory) and benchmarks; torch has no allocator statistics on CPU.
"""

from __future__ import annotations

import itertools
import weakref

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    """Live bytes of every tensor storage that an aten op allocates while the mode is active, and their peak.

    This genuinely measures tensor memory on CPU, where torch has no allocator statistics (tracemalloc does
    not see torch's allocator, RSS is blurred by malloc caching): every op's output storage that does not
    alias one of its inputs (views, in-place and out= ops do) is a fresh allocation, counted until the
    storage is freed (a weakref finalizer; torch keeps one Python object per live storage). The mode is
    thread-local state that autograd carries into backward, so recomputed checkpoint chunks, gradients
    and the optimizer's temporaries are all seen. `log` keeps (record, +/-bytes) in order, so a peak can
    be replayed over any phase while leaving out chosen records (the parameters' gradients).
    """

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[int, int]] = []
        self.live: dict[int, int] = {}  # data_ptr -> record
        self._ids = itertools.count()

    def _free(self, rec: int, ptr: int, nbytes: int) -> None:
        if self.live.get(ptr) == rec:
            del self.live[ptr]
        self.log.append((rec, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self.live:
                continue
            rec = next(self._ids)
            self.live[ptr] = rec
            self.log.append((rec, nbytes))
            weakref.finalize(st, self._free, rec, ptr, nbytes)
        return out

    def peak(self, start: int = 0, end: int | None = None, skip: set[int] = frozenset()) -> int:
        """Return the peak live bytes over log[start:end], not counting records in `skip`."""
        cur = best = 0
        for rec, nbytes in self.log[start:end]:
            if rec not in skip:
                cur += nbytes
                best = max(best, cur)
        return best
