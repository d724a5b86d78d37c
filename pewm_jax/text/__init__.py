"""The text contracts every layer shares: the tokenizer's specials and location tokens
(`tokenizer`), and the planner's prompt and plan format (`plan`). Bottom layer: numpy, jax.numpy
and `tokenizers` only."""
