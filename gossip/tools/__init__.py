"""Tools around the runtime: the timeline (:mod:`.timeline`), checkpoints (:mod:`.checkpoint`),
training metrics (:mod:`.metrics`: consensus distance, the averaged model), datasets for the
examples and benchmarks (:mod:`.data`), the launcher ``gossiprun`` (:mod:`.launch`) and the
multi-machine emulator (:mod:`.emulate`)."""

from gossip.tools import checkpoint, data, metrics, timeline

__all__ = ["checkpoint", "data", "metrics", "timeline"]
