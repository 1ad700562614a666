"""What autograd really holds after a forward pass: the storages ops made that are still alive."""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveStorages(TorchDispatchMode):
    """Records every storage an op creates inside the block; :meth:`alive_bytes` counts those still alive.

    After a forward pass whose locals are gone, what is alive is what the
    autograd graph holds (and what the caller keeps, e.g. the output).
    Storages an op writes into (in-place, ``out=``) or returns views of belong
    to its inputs and are not recorded.
    """

    def __init__(self) -> None:
        super().__init__()
        self.created: dict[int, tuple[StorageWeakRef, int, torch.device]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        inputs = set()
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.layout == torch.strided:
                inputs.add(leaf.untyped_storage().data_ptr())
            elif isinstance(leaf, (torch.UntypedStorage, torch.TypedStorage)):  # set_(storage)
                inputs.add(leaf.data_ptr())
        output = func(*args, **kwargs)
        for leaf in tree_leaves(output):
            if not isinstance(leaf, torch.Tensor) or leaf.layout != torch.strided:
                continue
            storage = leaf.untyped_storage()
            key = storage.data_ptr()
            if key in inputs or storage.nbytes() == 0:
                continue
            known = self.created.get(key)
            if known is None or known[0].expired():
                self.created[key] = (StorageWeakRef(storage), storage.nbytes(), leaf.device)
        return output

    def alive_bytes(self, *excluded: torch.Tensor, device: torch.device | str | None = None) -> int:
        """Bytes of the recorded storages still alive, leaving out those of ``excluded``.

        ``device``: count only the storages on that device.
        """
        skip = {tensor.untyped_storage().data_ptr() for tensor in excluded}
        wanted = torch.device(device) if device is not None else None
        return sum(
            nbytes
            for key, (ref, nbytes, where) in self.created.items()
            if key not in skip and not ref.expired() and (wanted is None or where == wanted)
        )
