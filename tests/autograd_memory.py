"""Measuring what autograd keeps for backward (memory tests of the layers)."""

import torch


def saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs, and
    ``fn``'s output."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
