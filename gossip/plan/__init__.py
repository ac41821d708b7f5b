"""What each step communicates: plans and schedules (:mod:`.schedule`), the topology-aware
scheduler (:mod:`.scheduler`), its cost model (:mod:`.cost_model`), the link probe
(:mod:`.probing`) and the models of named clusters (:mod:`.profiles`)."""
