"""The update and its parallelism: optimizers, the DeepSpeed and plain-torch updaters, collectives, checkpoints."""
