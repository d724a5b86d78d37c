"""The planner: a Flax NNX port of PaliGemma (SigLIP vision + Gemma decoder), Hugging Face weight
conversion, and the plan grammar, parser and constrained decoding."""
