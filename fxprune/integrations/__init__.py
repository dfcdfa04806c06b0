"""fxprune inside the training frameworks users run; each module imports its framework
lazily, only when it is imported itself: :mod:`fxprune.integrations.hf` (the Hugging Face
Trainer), :mod:`fxprune.integrations.lightning` (Lightning)."""
