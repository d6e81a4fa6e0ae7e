"""raychat: nanochat's GPT pretraining as a Ray application (Ray Train, Ray Data, Ray Tune)."""

__version__ = "0.1.0"
