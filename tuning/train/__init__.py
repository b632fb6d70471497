"""The training stack: one config trained in this process or data-parallel (loop, ddp, distributed), its
checkpoints, gating health and evaluation, and `gatetune train` (run). Imports neither Ray nor Optuna
(tests/test_layering.py checks it): a trial of the search stack calls it like any other caller."""
