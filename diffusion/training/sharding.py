"""Sharding a backbone block by block with FSDP2 (``fully_shard``)."""

from __future__ import annotations

from torch import nn


def shard_units(backbone: nn.Module) -> list[nn.Module]:
    """The blocks sharded one by one: the backbone's declared ``block_types``, innermost first."""
    types = tuple(getattr(backbone, "block_types", ()))
    if not types:
        raise ValueError(f"{type(backbone).__name__} declares no block_types; FSDP shards a backbone block by block")
    return [m for m in reversed(list(backbone.modules())) if isinstance(m, types)]


def fully_shard_by_block(backbone: nn.Module, mesh, *, forward_only: bool = False) -> nn.Module:
    """FSDP2: each block its own unit (gathered only while it runs), then the rest of the backbone.

    The root's parameters stay gathered after forward, for the backward that follows, unless
    ``forward_only`` (a copy that never runs backward, like the EMA): then they are sharded again,
    so that its parameters are always its shards."""
    from torch.distributed.fsdp import fully_shard

    for block in shard_units(backbone):
        fully_shard(block, mesh=mesh)
    fully_shard(backbone, mesh=mesh, reshard_after_forward=True if forward_only else None)
    return backbone


def fsdp2_strategy(save_distributed_checkpoint: bool = False, **kwargs):
    """Lightning's ModelParallelStrategy as pure FSDP2: one data-parallel mesh over every process
    (its "auto" would give the data dimension one entry per node, the rest to tensor parallelism).
    Checkpoints are consolidated into one file unless ``save_distributed_checkpoint``."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2Strategy(ModelParallelStrategy):
        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes
            super().setup_environment()

    return FSDP2Strategy(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
