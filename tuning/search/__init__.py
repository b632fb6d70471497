"""The search stack: the search space, Optuna behind Ray Tune's Searcher (study, confirm, export), the
schedulers, the trainable that runs the training stack in a trial, the cluster connection, what the driver
prints and exports, and `gatetune search` / `gatetune resume` (run). The only code that imports Ray or
Optuna (tests/test_layering.py checks it)."""
