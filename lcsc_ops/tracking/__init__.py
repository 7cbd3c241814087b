"""Layer 3: the edges that talk to MLflow and Optuna (the only modules that import them)."""
