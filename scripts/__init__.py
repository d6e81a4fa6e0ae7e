"""Command-line scripts run as modules, e.g. `python -m scripts.tok_train` (the reference's layout)."""
