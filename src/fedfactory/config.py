"""Run configuration: TOML files plus `--set section.key=value` overrides, validated against DEFAULTS.

Every key a config may hold is in DEFAULTS (with its type); anything else is an error that
names the key and the nearest valid one.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import tomli_w

from .errors import FedFactoryError
from .modules.fileformat import check_client_id
from .modules.registry import config_keys, get_kind, key_rules, module_kinds, samplers

class FromPreset:
    """The default of a key whose absence means "the module preset's value"; `example` gives its type."""

    def __init__(self, example):
        self.example = example

    def __repr__(self):
        return "<the preset's value>"


DEFAULTS: dict = {
    "seed": 0,
    "data": {
        "name": "fashion-mnist",
        "root": "",          # folder (or file) override; "" = the data set's default location
        "size": 0,           # resize to size x size pixels; 0 = the data set's default
        "download": False,   # MedMNIST: download a missing file with the medmnist package
        "train_per_class": 0,  # cap on real training images per class (0 = all): toy runs and tests
        "test_per_class": 0,   # cap on test images per class (0 = all)
        # The federation's class list: a class's global id is its place here. Sites name their
        # class folders (or CSV labels) after it. Empty = the data set's own class names.
        "classes": [],
        "channels": 0,       # site folders: 1 (grey) or 3 (colour); 0 = grey if every image is grey
    },
    "partition": {
        "scheme": "silos",   # silos | pathological:<k> | dirichlet:<alpha> | iid | natural
        "clients": 10,
        "min_size": 10,      # dirichlet: the smallest client
        "exclude": [],       # client ids left out of the federation (e.g. to check unlearning)
    },
    "module": {
        # Every other module key is optional and comes from the registry of module kinds
        # (modules/registry.py: each kind's preset keys, e.g. channels, budget_images, sampler, the
        # cVAE's beta); a key left out takes the module preset's value (kinds and presets differ; see
        # modules/diffusion.py and modules/cvae.py). `_module_keys()` adds them below.
        "kind": "diffusion",  # a registered kind: diffusion | cvae | a plugin's
        "preset": "cpu",      # cpu | gpu (minutes on one GPU) | paper (the paper's scale): network and budgets
    },
    "factory": {
        "per_class": 1000,         # synthetic images per class
        "aggregation": "weighted",  # weighted | uniform: how a shared class is split over modules
        "missing_classes": "error",  # error | drop: a class that no module covers
        "keep_shards": True,        # keep each draw in RUN_DIR/synthetic/: resume and unlearn reuse it
        "max_share": 1.0,           # the most of a class's synthetic images one module supplies while others hold it
        "check_samples": 100,       # images per (module, class) with which modules sharing a class check each other (0 = off)
        "outliers": "flag",         # flag | drop: a (module, class) the check flags is only reported, or left out of synthesis
    },
    "classifier": {
        "mode": "server",       # server | local (Product of Experts)
        "preset": "cpu",        # cpu | gpu (ResNet-18-like)
        "width": 0,             # base channels (0 = preset)
        "budget_images": 300000,  # training images seen (same budget for every baseline)
        "batch_size": 128,
        "optimizer": "sgd",     # sgd (cosine schedule) | adamw
        "lr": 0.05,
        "weight_decay": 5e-4,
        "augment": "auto",      # auto (by data set) | natural | dihedral | none
        "blur": 0.0,            # random Gaussian blur, sigma ~ U(0, blur) px (0 = off): against generator artifacts
        "label_smoothing": 0.0,  # target mass spread uniformly over the classes (0 = off)
        "mixup": 0.0,           # mixup's Beta(a, a) parameter (0 = off)
        "ema_halflife_images": 0,  # the returned network is an EMA of the weights with this half-life (0 = off)
        "missing_experts": "error",  # local mode, a site sent no expert: error | drop (Product of the others)
    },
    "federation": {              # what the server accepts from peers, and what it does when one fails
        "on_node_failure": "fail",   # fail | continue: a node that errs, stays silent or sends a refused module
        "clients": [],               # the roster: client ids allowed to upload (empty = any valid id, once each)
        "roster": "",                # the consortium's agreement (roster.py): each site's classes, counts and key
        "max_parameters": 100_000_000,  # a module's declared network, counted before anything is built
        "max_channels": 1024,
        "max_resolution": 512,
        "max_count": 10_000_000,     # real images a module may claim per class
        "max_module_bytes": 1 << 30,
    },
    "privacy": {                 # what a module may reveal about a site's images (privacy/; README "Privacy")
        "holdout": 0.1,          # share of each class held out of module training as the site's audit set (0 = no audit)
        "audit_samples": 200,    # generated images per class that the audit measures
        "max_copy_rate": 0.05,   # share of generated images that are near-copies (d1/d2 < 1/3) a module may have
        "max_closer_to_train": 0.6,  # share of generated images nearer a training than a held-out image
        "max_mia_auc": 0.6,      # AUC of the loss-threshold membership attack
        "significance": 0.001,   # level of the two tests (closer-to-train, attack) before a module is refused
        "enforce": True,         # a module that fails its audit is not uploaded (false: it is, with a warning)
        "epsilon": 0.0,          # DP-SGD: target epsilon (0 = no DP unless noise_multiplier is set)
        "noise_multiplier": 0.0,  # DP-SGD: noise multiplier instead of a target epsilon
        "delta": 0.0,            # DP-SGD: delta (0 = 1 / (10 N), below 1/N for a site of N images)
        "max_grad_norm": 1.0,    # DP-SGD: per-sample gradient clip norm
        "accountant": "prv",     # DP-SGD: prv | rdp
        "noise_multiplicity": 1,  # DP-SGD: noise levels per image per step (DPDM), no extra privacy cost
    },
    "quality": {                 # each module's samples against the real test images of its class (quality.py)
        "reference_budget": 50_000,  # images that train the feature classifier on the run's real training data (0 = no report)
        "max_images": 1000,      # synthetic and real images per (module, class) that are measured
        "k": 5,                  # nearest neighbours for precision, recall, density and coverage
    },
    "baselines": {               # weight-averaging baselines on the same partition and classifier
        "rounds": 30,
        "local_epochs": 1,
        "lr": 0.05,              # plain SGD, as the algorithms' papers use
        "fraction": 1.0,         # clients per round
        "mu": 0.01,              # FedProx proximal weight
        "alpha": 0.01,           # FedDyn regulariser
        "eval_every": 1,         # rounds between test evaluations (the learning curve)
    },
    "runtime": {
        "device": "auto",   # auto | cpu | cuda
        "bf16": "auto",     # auto (on where it is faster) | on | off
        "threads": 0,       # torch CPU threads (0 = all cores; with parallel_clients, cores / workers each)
        "parallel_clients": 0,  # client modules trained at once, in separate processes (0 = automatic: runtime.site_split)
        "compile": False,   # torch.compile on GPU
        "deterministic": True,  # GPU: deterministic kernels (same GPU, driver and torch give the same bits)
        "progress": True,
    },
}


def _module_keys() -> dict:
    """DEFAULTS, its module section completed with every key a registered kind reads (a kind may
    register after this file is imported: a plugin), each defaulting to the preset's value; the keys
    of a kind since unregistered leave it."""
    keys, module = config_keys(), DEFAULTS["module"]
    for key in [k for k, v in module.items() if isinstance(v, FromPreset) and k not in keys]:
        del module[key]
    for key, example in keys.items():
        module.setdefault(key, FromPreset(example))
    return DEFAULTS


_module_keys()


def _flat_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out += _flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _unknown(key: str) -> FedFactoryError:
    near = difflib.get_close_matches(key, _flat_keys(_module_keys()), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return FedFactoryError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value, default):
    """Check a value against its default's type; ints are accepted where floats are expected."""
    if isinstance(default, FromPreset):
        default = default.example
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise FedFactoryError(f"config key {key!r} must be true or false, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FedFactoryError(f"config key {key!r} must be a number, got {value!r}")
        value = float(value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise FedFactoryError(f"config key {key!r} must be an integer, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise FedFactoryError(f"config key {key!r} must be a string, got {value!r}")
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise FedFactoryError(f"config key {key!r} must be a list, got {value!r}")
    return value


def _merge(base: dict, update: dict, prefix: str = "") -> None:
    for k, v in update.items():
        key = f"{prefix}{k}"
        if k not in base:
            raise _unknown(key)
        if isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise FedFactoryError(f"config key {key!r} is a section; give it as [{key}]")
            _merge(base[k], v, key + ".")
        else:
            base[k] = _coerce(key, v, base[k])


def _parse_value(text: str):
    """A TOML value (number, bool, list, quoted string); anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def set_value(cfg: dict, assignment: str) -> None:
    """Apply one `section.key=value` override in place."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise FedFactoryError(f"--set expects key=value, got {assignment!r}")
    *sections, leaf = key.split(".")
    node, default = cfg, _module_keys()
    for s in sections:
        if s not in default or not isinstance(default[s], dict):
            raise _unknown(key)
        node, default = node[s], default[s]
    if leaf not in default or isinstance(default[leaf], dict):
        raise _unknown(key)
    node[leaf] = _coerce(key, _parse_value(text.strip()), default[leaf])


def _drop_unset(cfg: dict) -> dict:
    """Keys still holding their FromPreset default leave the config: the preset decides them."""
    for k, v in list(cfg.items()):
        if isinstance(v, FromPreset):
            del cfg[k]
        elif isinstance(v, dict):
            _drop_unset(v)
    return cfg


def load_config_text(text: str) -> dict:
    """A config from TOML text (as the Flower ServerApp sends it)."""
    cfg = copy.deepcopy(_module_keys())
    try:
        _merge(cfg, tomllib.loads(text))
    except tomllib.TOMLDecodeError as e:
        raise FedFactoryError(f"config is not valid TOML: {e}") from None
    validate(_drop_unset(cfg))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict:
    cfg = copy.deepcopy(_module_keys())
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FedFactoryError(f"config file {path} not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise FedFactoryError(f"config file {path} is not valid TOML: {e}") from None
        _merge(cfg, data)
    for o in overrides:
        set_value(cfg, o)
    validate(_drop_unset(cfg))
    return cfg


CHOICES = {
    "factory.aggregation": ("weighted", "uniform"), "factory.missing_classes": ("error", "drop"),
    "factory.outliers": ("drop", "flag"),
    "classifier.missing_experts": ("error", "drop"), "federation.on_node_failure": ("fail", "continue"), "data.channels": (0, 1, 3),
    "classifier.mode": ("server", "local"), "classifier.preset": ("cpu", "gpu"),
    "classifier.optimizer": ("sgd", "adamw"), "classifier.augment": ("auto", "natural", "dihedral", "none"),
    "runtime.device": ("auto", "cpu", "cuda"), "runtime.bf16": ("auto", "on", "off"),
    "privacy.accountant": ("prv", "rdp"),
}
# key -> (low, high), both inclusive
RANGES = {"factory.max_share": (0.01, 1.0), "factory.check_samples": (0, 100_000), "privacy.holdout": (0.0, 0.5), "privacy.max_copy_rate": (0.0, 1.0), "privacy.max_closer_to_train": (0.5, 1.0),
          "privacy.max_mia_auc": (0.5, 1.0), "privacy.significance": (1e-12, 0.5), "privacy.epsilon": (0.0, 1e6),
          "privacy.noise_multiplier": (0.0, 1e3), "privacy.delta": (0.0, 0.5), "privacy.max_grad_norm": (1e-9, 1e9),
          "privacy.noise_multiplicity": (1, 64), "privacy.audit_samples": (1, 100_000),
          "quality.reference_budget": (0, 10**10), "classifier.label_smoothing": (0.0, 0.5), "quality.max_images": (10, 10**6), "quality.k": (1, 100)}
POSITIVE = ("federation.max_parameters", "federation.max_channels", "federation.max_resolution",
            "federation.max_count", "federation.max_module_bytes", "baselines.rounds", "baselines.local_epochs", "baselines.lr", "baselines.fraction", "baselines.eval_every",
            "factory.per_class", "classifier.budget_images", "classifier.batch_size", "classifier.lr")
NON_NEGATIVE = ("runtime.parallel_clients", "classifier.blur", "classifier.mixup", "classifier.ema_halflife_images")


def get(cfg: dict, key: str, default=None):
    node = cfg
    for part in key.split("."):
        if part not in node:
            return default
        node = node[part]
    return node


def _module_choices(cfg: dict) -> dict:
    """The module section's choices, from the registry: the kinds, and the chosen kind's presets."""
    kind = get(cfg, "module.kind")
    presets = tuple(get_kind(kind).presets) if kind in module_kinds() else ()
    return {"module.kind": tuple(module_kinds()), "module.preset": presets}


def _validate_module_keys(cfg: dict) -> None:
    """Module keys are checked only when set (absent = the preset's value), by the rule their kind declares."""
    for leaf, rule in key_rules().items():
        key, value = f"module.{leaf}", get(cfg, f"module.{leaf}")
        if value is None or isinstance(value, (str, list, bool)):
            continue
        if rule == "positive" and value <= 0:
            raise FedFactoryError(f"config key {key!r} must be > 0 (leave it out for the preset's value); got {value!r}")
        if rule == "non-negative" and value < 0:
            raise FedFactoryError(f"config key {key!r} must be >= 0; got {value!r}")
    allowed = samplers()
    if get(cfg, "module.sampler") not in (None, *allowed):
        raise FedFactoryError(f"config key 'module.sampler' must be {' or '.join(allowed)}; "
                              f"got {get(cfg, 'module.sampler')!r}")


def validate(cfg: dict) -> None:
    for key, allowed in {**_module_choices(cfg), **CHOICES}.items():
        if get(cfg, key) not in allowed:
            raise FedFactoryError(f"config key {key!r} must be one of {', '.join(allowed)}; got {get(cfg, key)!r}")
    for key in POSITIVE:
        if get(cfg, key) <= 0:
            raise FedFactoryError(f"config key {key!r} must be > 0; got {get(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if get(cfg, key, 0) < 0:
            raise FedFactoryError(f"config key {key!r} must be >= 0; got {get(cfg, key)!r}")
    _validate_module_keys(cfg)
    for key, (low, high) in RANGES.items():
        if not low <= get(cfg, key) <= high:
            raise FedFactoryError(f"config key {key!r} must be in [{low:g}, {high:g}]; got {get(cfg, key)!r}")
    if cfg["classifier"]["mode"] == "local" and (cfg["privacy"]["epsilon"] > 0 or cfg["privacy"]["noise_multiplier"] > 0):
        # Each site's expert is trained on its real images without DP and leaves the site: the epsilon would
        # cover the modules only, and a data-protection officer would read it as covering the run.
        raise FedFactoryError("differential privacy covers the modules only, and local mode also sends each site's "
                              "expert, a classifier trained on its real images without it: set "
                              "classifier.mode = \"server\" for a DP run (--set classifier.mode=server)")
    for cid in cfg["federation"]["clients"]:
        check_client_id(cid)
    classes = cfg["data"]["classes"]
    if any(not isinstance(c, str) or not c.strip() for c in classes) or len(set(classes)) != len(classes):
        raise FedFactoryError(f"data.classes must be distinct, non-empty class names; got {classes!r}")


def dumps(cfg: dict) -> str:
    return tomli_w.dumps(cfg)
