"""The starting policy: the warm start of the tiny model and the gold tool traces it learns from."""
