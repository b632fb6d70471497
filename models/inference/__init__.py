"""The inference runtime: a trained GatedNet converted to a SkipNet that computes only the kept channels
(skip, skip_gate), the batch-1 C++ gate kernel (kernel) and the per-machine choice among equivalent ways
to run each site, by measured cost (autotune)."""
