"""Classifiers: ResNet-style networks, training on real or synthetic data, Product of Experts."""

from .train import (build_classifier, classifier_from_bytes, classifier_to_bytes, predict_log_proba,
                    product_of_experts, train_classifier)

__all__ = ["build_classifier", "classifier_from_bytes", "classifier_to_bytes", "predict_log_proba",
           "product_of_experts", "train_classifier"]
