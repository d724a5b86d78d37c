"""Training: the sharded train state and step, Orbax checkpoints, metrics, and the train loop."""
