"""The non-finite-loss stop, read without making the host wait on the device each step.

Reading a device tensor on the host waits for everything queued on the device before it: at the
start of a step, all of the previous step, so the device idles while the host queues the next one.
Instead each step's loss is copied to host memory without blocking (pinned memory, with an event
marking the copy), and read at the start of the step after next, by which time the device has
long finished it; the host waits for the copy only if it runs two steps ahead, which leaves a
step of work queued on the device. Before a checkpoint is written and at the end of training every
loss is read, waiting if needed, so no checkpoint holds weights a non-finite loss has updated.

Every process reads the same losses (the loss is averaged over processes) at the same steps, so
all stop together. A check that read a copy as soon as it happened to arrive (``event.query()``)
would stop the processes at different steps and leave the others waiting in the next all-reduce.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _Copy:
    value: Tensor  # the loss in host memory, once `ready` has completed
    ready: torch.Event | None  # None on a CPU: the value is there as soon as it is computed
    step: int


def _to_host(loss: Tensor) -> tuple[Tensor, torch.Event | None]:
    """Start copying a scalar loss into (pinned) host memory; the event completes with the copy."""
    loss = loss.detach().float()
    if loss.device.type == "cpu":
        return loss, None
    value = loss.to("cpu", non_blocking=True)  # pinned: a copy from an accelerator, non-blocking
    ready = torch.Event(device=loss.device)
    ready.record()
    return value, ready


class FiniteLossCheck:
    """``record(loss, step)`` after each training loss; ``check()`` at the start of each training
    step raises FloatingPointError for a non-finite loss recorded before the previous step;
    ``check(wait_for_all=True)`` before a checkpoint is written and at the end of training."""

    def __init__(self, in_flight: int = 1):
        self.in_flight = in_flight  # losses left unread by check(): the newest steps, still on the device
        self._copies: deque[_Copy] = deque()

    def record(self, loss: Tensor, step: int) -> None:
        self._copies.append(_Copy(*_to_host(loss), step))

    def check(self, wait_for_all: bool = False) -> None:
        keep = 0 if wait_for_all else self.in_flight
        while len(self._copies) > keep:
            copy = self._copies.popleft()
            if copy.ready is not None:
                copy.ready.synchronize()  # at once unless the device is still on that step
            value = float(copy.value.numpy())  # host memory: numpy refuses device tensors
            if not math.isfinite(value):
                self._copies.clear()
                raise FloatingPointError(
                    f"non-finite training loss ({value}) at step {copy.step}; training stops here and the last "
                    "checkpoint is left as it was. Lower model.optim.optimizer.lr, raise model.optim.warmup_steps, "
                    "or clip gradients (trainer.gradient_clip_val)."
                )
