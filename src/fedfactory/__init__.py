"""FederatedFactory: generative one-shot federated learning for extremely non-IID data.

The public Python API (each name is imported on first use, so `import fedfactory` stays cheap):

    cfg = load_config("configs/fashion-silos.toml", ["seed=1"])   # a TOML file plus --set overrides
    results = run(cfg, "runs/x")                                  # the whole federation, sites simulated
    model = load_classifier("runs/x/model.safetensors")          # the run's self-describing classifier
    ids = model.predict(images_or_paths); proba = model.predict_proba(images_or_paths)

Configuration and whole runs
    load_config(path, overrides)          a validated, frozen Config: one dataclass per section
                                          (cfg.classifier.lr; cfg.replace({"seed": 1}) for a copy)
    run(cfg, run_dir, resume=False)       simulate the sites from a public data set, then the server
    compare(cfg, methods, seeds, out)     the factory against centralized and weight-averaging baselines
    unlearn(run_dir, client, ...)         rebuild a run without one client's module (exact unlearning)
A site's steps (its own data only; modules and answers travel as files)
    site_train(cfg, data, out, ...)       train, audit and write this site's generative module
    site_audit(cfg, module_dir, data)     audit a module against the site's images
    site_expert(cfg, data, module_dirs, out, client_id)   local mode: this site's expert classifier
    site_evaluate(model_file, test, client_id, out)       counts on its own test images, for the server
The server's steps
    server_build(cfg, module_dirs, test, out, expert_files)   verify, synthesize, train, evaluate, report
    server_pool(run_dir, answer_files)    the sites' evaluations into the run's metrics
Files and the model in use
    load_module(path)                     a generative module folder, verified
    load_classifier(path)                 a classifier file: predict, predict_proba, predict_log_proba
                                          on uint8 N x H x W x C arrays or image file paths
    predict_to_csv(model, source, out)    predictions.csv for a folder, image, CSV or .npz
    to_onnx(model)                        the classifier's whole decision as ONNX bytes
    FedFactoryError                       a user mistake: the message says what and where
"""

__version__ = "0.2.0"

_API = {
    "load_config": "config", "run": "runners.embedded", "compare": "runners.compare", "unlearn": "runners.unlearn",
    "site_train": "runners.files", "site_audit": "runners.files", "site_expert": "runners.files",
    "site_evaluate": "runners.files", "server_build": "runners.files", "server_pool": "runners.files",
    "load_module": "modules", "load_classifier": "classify.model", "predict_to_csv": "predict",
    "to_onnx": "export", "FedFactoryError": "errors",
}
_RENAMED = {"load_classifier": "load_classifier_file"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'fedfactory' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_API[name]}", __name__), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
