"""Export bundles for robots: the bundle writer, its runtime, the policy server."""
