"""Python objects through the runtime's collectives (pickled into uint8 tensors), for the few calls
of BlueFog's API that exchange more than tensors."""

from __future__ import annotations

import pickle

import torch

import gossip


def broadcast_object(obj, root: int = 0):
    """Collective: ``root``'s picklable ``obj`` on every rank (through the runtime's broadcast)."""
    data = pickle.dumps(obj) if gossip.rank() == root else b""
    length = int(gossip.broadcast(torch.tensor([len(data)], dtype=torch.int64), root).item())
    payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if gossip.rank() == root else \
        torch.empty(length, dtype=torch.uint8)
    return pickle.loads(gossip.broadcast(payload, root).numpy().tobytes())


def allgather_object(obj) -> list:
    """Collective: every rank's picklable ``obj``, in rank order (through the runtime's allgather)."""
    data = pickle.dumps(obj)
    lengths = gossip.allgather(torch.tensor([len(data)], dtype=torch.int64)).tolist()
    joined = gossip.allgather(torch.frombuffer(bytearray(data), dtype=torch.uint8)).numpy().tobytes()
    found, offset = [], 0
    for length in lengths:
        found.append(pickle.loads(joined[offset:offset + length]))
        offset += length
    return found
