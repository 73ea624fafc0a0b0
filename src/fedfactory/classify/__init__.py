"""Classifiers: ResNet-style networks, training on real or synthetic data, Product of Experts."""

from .train import build_classifier, predict_log_proba, product_of_experts, train_classifier

__all__ = ["build_classifier", "predict_log_proba", "product_of_experts", "train_classifier"]
