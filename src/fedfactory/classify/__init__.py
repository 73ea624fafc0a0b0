"""Classifiers: ResNet-style networks, training on real or synthetic data, Product of Experts."""

from .registry import classifier_networks, register_classifier, unregister_classifier
from .train import (build_classifier, classifier_from_bytes, classifier_to_bytes, predict_log_proba,
                    product_of_experts, train_classifier)

__all__ = ["build_classifier", "classifier_from_bytes", "classifier_networks", "classifier_to_bytes",
           "predict_log_proba", "product_of_experts", "register_classifier", "train_classifier",
           "unregister_classifier"]
