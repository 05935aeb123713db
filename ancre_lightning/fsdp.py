"""Fully sharded data parallel training (FSDP2) of every domain's network, on CPUs or GPUs.

One code path for a laptop's two CPU processes over gloo and a node of GPUs over NCCL: Lightning's
:class:`~lightning.pytorch.strategies.ModelParallelStrategy` (PyTorch's ``fully_shard``, FSDP2),
which, unlike Lightning's ``FSDPStrategy`` (FSDP1), also runs on a CPU accelerator, so the tests
exercise the code that GPUs run. :class:`ShardedStrategy` is that strategy with the mesh a data-
parallel run wants (every process shards, no tensor parallelism); :func:`shard_network` is what
:meth:`ConnectivityModule.configure_model <ancre_lightning.modules.base.ConnectivityModule.configure_model>`
does under it:

- one FSDP unit per layer of every wired stack (a whole block, or an attention or MLP sub-layer
  at ``granularity: sublayer``; a ResNet's residual blocks, a ViT's, Mixer's or DiT's blocks, the
  blocks of a ``rewire``d model), gathered just before the layer runs and freed after it;
- one root unit for the rest (embedding, final norm, head, conditioning), gathered for the whole
  forward;
- the wiring's own parameters (gates, queries, stream maps) left out of FSDP: every process keeps
  them whole, in float32, whatever the precision, so callbacks read them without a collective
  (gate heatmaps, sparsity, temperature) and their gradients are averaged over the processes
  after each backward (:func:`all_reduce_replicated_grads`), as DDP would.

Gradient-norm clipping over sharded and whole gradients together is :func:`clip_grad_norm_`.
Checkpoints are written sharded, one folder of ``.distcp`` files and a ``meta.pt`` (Lightning's
distributed checkpoint), whole or not at all (written beside the old one, then moved into place),
and resume exactly on the same number of processes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn

from .connectivity import ConnectedStack
from .errors import UserInputError

__all__ = [
    "SHARDED_METADATA", "ShardedStrategy", "all_reduce_replicated_grads", "clip_grad_norm_", "is_sharded",
    "read_sharded_weights", "shard_network",
]


#: the file of a sharded checkpoint folder that holds everything but the weights and optimizer state
#: (Lightning's distributed checkpoint writes it beside the shards)
SHARDED_METADATA = "meta.pt"

#: methods of a network that callbacks and the modules call directly (early exits, the chunked loss's
#: head): under FSDP each gathers the root's weights first, as ``net(...)`` does
FORWARD_METHODS = ("forward_features", "forward_head")


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 over every process: each process holds 1/N of every layer's weights, gradients and
    AdamW state, and gathers a layer's weights just before it runs.

    Lightning's ``ModelParallelStrategy`` with a one-dimensional mesh: the data-parallel size is
    the number of processes (all nodes, all devices), the tensor-parallel size 1. The network is
    sharded by the module's ``configure_model`` (see :func:`shard_network`).

    Args:
        reshard_after_forward: free each layer's gathered weights after its forward and gather them
            again for backward (least memory, ZeRO-3); false keeps them from forward to backward
            (one all-gather fewer per layer and step, ZeRO-2-like memory).
        save_distributed_checkpoint: write checkpoints sharded, a folder with one file per process
            (fast, no process holds the whole model); false gathers the whole model and optimizer
            state on rank 0 into one ``.ckpt`` file (readable anywhere, e.g. by ``ancre generate``).
        process_group_backend: ``"gloo"`` for CPUs, ``"nccl"`` for GPUs; default: the device's.
        timeout: how long a collective may wait for the other processes.
    """

    def __init__(
        self,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend, timeout=timeout,
        )  # fmt: skip
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # data parallel over every process (ModelParallelStrategy's "auto" is the number of nodes)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write a sharded checkpoint whole or not at all: every process writes into
        ``<name>.saving`` beside the target, and only when all are done does rank 0 move it into
        place (the old folder is renamed aside first and removed last), so a run killed while
        saving keeps its previous checkpoint. A single-file checkpoint goes through Lightning's
        own save."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staging = path.with_name(path.name + STAGING_SUFFIX)
        if self.global_rank == 0 and staging.exists():
            shutil.rmtree(staging)  # what a run killed while saving left behind
        self.barrier("sharded_save_start")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("sharded_save_written")
        if self.global_rank == 0:
            replace_path(staging, path)
        self.barrier("sharded_save_moved")


#: the suffix of the folder a sharded checkpoint is written to before it replaces the old one
STAGING_SUFFIX = ".saving"


def replace_path(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``, replacing what is there (a folder or a file): the old
    one is renamed aside, the new one renamed into place, then the old one removed."""
    aside = target.with_name(target.name + ".old")

    def remove_aside() -> None:
        if aside.is_dir():
            shutil.rmtree(aside)
        elif aside.exists():
            aside.unlink()

    remove_aside()  # what an earlier replace killed half-way left
    if target.exists():
        os.replace(target, aside)
    os.replace(new, target)
    remove_aside()


def wiring_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The parameters of every connectivity of ``net`` (kept whole on every process), in the order
    of ``net.modules()``, which is the same on every process (a collective over them relies on it)."""
    seen: dict[int, nn.Parameter] = {}
    for module in net.modules():
        if isinstance(module, ConnectedStack):
            seen.update((id(p), p) for p in module.connectivity.parameters())
    return list(seen.values())


def shard_network(net: nn.Module, mesh: Any, reshard_after_forward: bool = True) -> list[nn.Module]:
    """Apply FSDP2's ``fully_shard`` to ``net`` in place: one unit per layer of every wired stack,
    then the root for the rest; the wiring's parameters stay whole (see the module docstring).

    Args:
        net: the network (it must hold at least one :class:`ConnectedStack`).
        mesh: a one-dimensional device mesh over the data-parallel processes.
        reshard_after_forward: see :class:`ShardedStrategy`.

    Returns:
        The layers made FSDP units, in order.

    Raises:
        UserInputError: the network has no wired stack (nothing to shard layer by layer), or the
            mesh is not one-dimensional.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if mesh.ndim != 1:
        raise UserInputError(f"FSDP shards over one data-parallel mesh dimension, got a {mesh.ndim}-dimensional mesh; "
                             "use ancre_lightning.fsdp.ShardedStrategy (tensor_parallel_size 1)")  # fmt: skip
    stacks = [m for m in net.modules() if isinstance(m, ConnectedStack)]
    if not stacks:
        raise UserInputError(
            f"FSDP: {type(net).__name__} has no wired stack of layers (ConnectedStack) to shard layer by layer; "
            "build the network with a connectivity (or rewire it), or train it with DDP (configs/trainer/ddp_*.yaml)"
        )
    replicated = wiring_parameters(net)  # in the modules' order: the same on every process
    ignored = set(replicated)
    units: list[nn.Module] = []
    for stack in stacks:
        for layer in stack.blocks:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
            units.append(layer)
    # the root: embedding, norms, head; gathered for the whole forward, so no resharding in between
    fully_shard(net, mesh=mesh, reshard_after_forward=False, ignored_params=ignored)
    for method in FORWARD_METHODS:  # the exits' surface, called without going through net(...)
        if callable(getattr(net, method, None)):
            register_fsdp_forward_method(net, method)
    net._replicated_parameters = replicated  # type: ignore[attr-defined]  # read by all_reduce_replicated_grads
    return units


def is_sharded(net: nn.Module) -> bool:
    """Whether :func:`shard_network` has been applied to ``net``."""
    return hasattr(net, "_replicated_parameters")


def all_reduce_replicated_grads(net: nn.Module) -> None:
    """Average the gradients of the parameters FSDP leaves whole (the wiring's) over the processes,
    in one collective: what DDP does for every parameter and FSDP does for the sharded ones."""
    params = [p for p in getattr(net, "_replicated_parameters", ()) if p.grad is not None]
    if not params or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])  # (sum of numel,)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Scale the gradients so that their global 2-norm is at most ``max_norm``, when some are
    sharded (DTensor) and some whole (the same on every process); returns the norm before clipping.

    The sharded gradients' squared norms are summed over the processes, the whole ones counted once.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = [g for g in grads if isinstance(g, DTensor)]
    whole = [g for g in grads if not isinstance(g, DTensor)]
    device = (sharded[0].to_local() if sharded else whole[0]).device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in sharded:
        sq += g.to_local().to(torch.float32).pow(2).sum()
    if sharded and dist.is_initialized():
        dist.all_reduce(sq, group=sharded[0].device_mesh.get_group())
    for g in whole:
        sq += g.to(torch.float32).pow(2).sum()
    norm = sq.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    factor = float(scale)
    if factor < 1.0:
        for g in grads:
            g.mul_(factor)
    return norm


# --------------------------------------------------------------------------- reading shards back whole

#: the classes a distributed checkpoint's ``.metadata`` pickle may name (module -> names; None: any
#: dtype of torch): the checkpoint's own metadata records, tensor sizes, dtypes and layouts, paths
_METADATA_GLOBALS: dict[str, set[str] | None] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": None,
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


def _metadata_class(module: str, name: str) -> Any:
    """The global a ``.metadata`` pickle names, if it is one of :data:`_METADATA_GLOBALS`."""
    import importlib
    import pickle

    allowed = _METADATA_GLOBALS.get(module, set())
    if module == "torch":
        value = getattr(torch, name, None)
        if name == "Size" or isinstance(value, torch.dtype):
            return value
    elif allowed and name in allowed:
        return getattr(importlib.import_module(module), name)
    raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def _read_metadata_safely(path: Path) -> Any:
    """A distributed checkpoint's ``.metadata`` unpickled with only the classes such a file holds,
    so a crafted file cannot run code (PyTorch's own reader unpickles anything)."""
    import pickle

    class MetadataUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return _metadata_class(module, name)

    with open(path, "rb") as f:
        return MetadataUnpickler(f).load()


def read_sharded_weights(folder: str | os.PathLike[str], prefix: str = "state_dict.") -> dict[str, Tensor]:
    """The whole weights of a sharded (FSDP) checkpoint folder, gathered from every process's
    shard in one process without a process group: ``{name: tensor}`` for every tensor under
    ``prefix`` (the module's ``state_dict``; the optimizer state is not read). The shards are read
    by PyTorch's distributed-checkpoint reader (tensors with ``weights_only``), its ``.metadata``
    with only the classes such a file holds.

    Raises:
        UserInputError: the folder's ``.metadata`` is missing, damaged or names another class.
    """
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from .errors import load_failure

    folder = Path(folder)
    try:
        metadata = _read_metadata_safely(folder / ".metadata")
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError, ValueError) as exc:
        raise UserInputError(
            f"sharded checkpoint {str(folder)!r}: its .metadata cannot be read safely: {load_failure(exc)}; "
            "use another checkpoint or a complete copy"
        ) from None

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return metadata

    state = {fqn: torch.empty(md.size, dtype=md.properties.dtype)
             for fqn, md in metadata.state_dict_metadata.items()
             if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata)}  # fmt: skip
    _load_state_dict(state, storage_reader=SafeReader(folder), planner=DefaultLoadPlanner(), no_dist=True)
    return {fqn[len(prefix):]: t for fqn, t in state.items()}
