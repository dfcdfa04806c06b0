"""The built-in digits application: scikit-learn's 8x8 handwritten digits, reference
models, a training loop (dense or pruning while training), the benchmark's recipes, and
the demo (``fxprune demo`` / ``make demo``)."""
