"""The pretraining driver: run config, data, models, methods, the loop, evaluation and integrations."""
