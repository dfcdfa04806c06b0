"""Views of a model and its gates: tables of groups and branches, per-layer costs, the
gate-placement picture, latency measurements."""
