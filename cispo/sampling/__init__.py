"""Where a step's samples come from: the sampler over an engine, the pipeline (synchronous or ahead of the update),
dynamic sampling and the curriculum, tool rollouts, and grading."""
