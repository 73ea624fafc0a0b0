"""FederatedFactory: generative one-shot federated learning for extremely non-IID data."""

__version__ = "0.2.0"
