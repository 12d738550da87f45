"""Counting what makes the host wait for the device: on an accelerator each such op waits until
the device has finished everything queued before it (a sync, a stall of the pipeline).

:class:`HostReads` is a dispatch mode that records, with a short Python stack of where it came
from, every op that hands a tensor's value to the host or whose output shape depends on values:
``aten._local_scalar_dense`` (``bool(t)``, ``int(t)``, ``float(t)``, ``t.item()``, ``if t:``),
``nonzero`` / ``masked_select`` / ``unique`` / boolean-mask indexing and the like, and
``aten.equal``; ``Tensor.tolist()``, which dispatches nothing on a CPU tensor; and blocking copies
between devices. On the CPU it stands in for the device: every tensor counts except the ones named
host tensors (the optimiser's step counts, which torch.optim keeps on the host on every device
unless ``capturable``). ``Tensor.numpy()`` is not counted: it refuses device tensors, so it only
ever reads host memory. A CPU run has no copies between devices; the meta device shows them.

:class:`CountHostReadsInSteps` is a Lightning callback (``+callbacks.host_reads._target_=
tests.host_reads.CountHostReadsInSteps``) that holds the mode from ``on_train_batch_start`` to
``on_train_batch_end`` of every step after the first: the training step, backward, gradient
clipping, the optimiser step, the EMA update and the learning-rate schedule.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose output shape depends on the values (the host must learn a count from the device).
_VALUE_SHAPED = {
    aten.nonzero.default, aten.argwhere.default, aten.masked_select.default, aten._unique.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor, aten.bincount.default, aten.equal.default,
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


@dataclass
class Read:
    op: str
    stack: list[traceback.FrameSummary]

    def __str__(self) -> str:
        frames = "".join(traceback.format_list(self.stack))
        return f"{self.op}, from\n{frames}"


def _waits(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether the op makes the host wait for the device."""
    if func is aten._local_scalar_dense.default or func in _VALUE_SHAPED:
        return True
    if func in _INDEXING:  # a boolean mask index is a nonzero inside ...
        indices = [i for i in args[1] if i is not None]
        if func is not aten.index.Tensor and len(indices) == 1 and args[2].numel() == 1 and not (
                args[3] if len(args) > 3 else kwargs.get("accumulate", False)):
            return False  # ... except for x[mask] = value, which torch turns into a masked_fill_
        return any(i.dtype in (torch.bool, torch.uint8) for i in indices)
    # A blocking copy between devices waits for the stream (none in a CPU run; the meta device shows them).
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and device != args[0].device and not kwargs.get("non_blocking", False)
    if func is aten.copy_.default:
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return args[0].device != args[1].device and not non_blocking
    return False


def _where(depth: int = 7) -> list[traceback.FrameSummary]:
    """The innermost ``depth`` frames of the caller outside torch's dispatch machinery and this file."""
    skip = ("torch/utils/_python_dispatch.py", "torch/_tensor.py", "torch/_compile.py", "torch/_dynamo/", __file__)
    return [f for f in traceback.extract_stack() if not any(s in f.filename for s in skip)][-depth:]


class HostReads(TorchDispatchMode):
    """``with HostReads(host_tensors) as reads: ...``; then ``reads.reads`` lists what was read."""

    def __init__(self, host_tensors: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.host_ids = {id(t) for t in host_tensors}
        self.reads: list[Read] = []
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _waits(func, args, kwargs) and not (args and id(args[0]) in self.host_ids):
            self.reads.append(Read(str(func), _where()))
        return func(*args, **kwargs)

    def __enter__(self):
        self._tolist, mode = torch.Tensor.tolist, self

        def tolist(tensor: torch.Tensor):
            if id(tensor) not in mode.host_ids:
                mode.reads.append(Read("Tensor.tolist", _where()))
            return mode._tolist(tensor)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def report(self) -> str:
        return "\n".join(f"read {i + 1}: {r}" for i, r in enumerate(self.reads))


def optimizer_step_counts(trainer: L.Trainer) -> list[torch.Tensor]:
    """The optimisers' ``step`` tensors: on the host on every device (torch.optim, capturable=False)."""
    return [s["step"] for opt in trainer.optimizers for s in opt.state.values()
            if isinstance(s.get("step"), torch.Tensor) and not opt.defaults.get("capturable")]


class CountHostReadsInSteps(L.Callback):
    """Records the host reads of every training step after the first (the first may set things up).
    The newest instance is ``CountHostReadsInSteps.latest``; ``reads[step]`` lists a step's reads."""

    latest: ClassVar["CountHostReadsInSteps | None"] = None

    def __init__(self) -> None:
        self.reads: dict[int, list[Read]] = {}
        self._mode: HostReads | None = None
        self._step = 0
        CountHostReadsInSteps.latest = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step + 1  # counted from 1
        if self._step >= 2:
            self._mode = HostReads(optimizer_step_counts(trainer))
            self._mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._leave()

    def on_exception(self, trainer, pl_module, exception):
        self._leave()

    def _leave(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.reads[self._step] = self._mode.reads
            self._mode = None

    def report(self) -> str:
        return "\n".join(f"step {step}: {len(reads)} host reads\n" + "\n".join(map(str, reads))
                         for step, reads in self.reads.items() if reads)
