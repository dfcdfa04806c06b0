"""Benchmarks, each measured side by side in one run (``fxprune bench NAME``): ``analyze``
(trace + analyze against Torch-Pruning), ``digits`` (pruning while training against dense
and magnitude pruning), ``latency`` (dense against compact), ``step`` (the cost of a
training step with gates), ``tradeoff`` (what gamma, beta and alpha do), ``zoo`` (the zoo
check side by side with Torch-Pruning on the same models)."""
