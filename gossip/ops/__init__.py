"""The operations users call: neighbour averaging (:mod:`.neighbor`), neighbour gathering
(:mod:`.neighbor_gather`), global collectives
(:mod:`.collectives`), hierarchical gossip (:mod:`.hierarchical`), one-sided windows
(:mod:`.window`), the parameter server (:mod:`.parameter_server`) and the handles of
non-blocking ops (:mod:`.handles`). Every op starts with the shared prologue (:mod:`._prologue`)
and moves its bytes through :mod:`gossip.transport`."""
