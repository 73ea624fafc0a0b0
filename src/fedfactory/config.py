"""Run configuration: one frozen dataclass per TOML section, each field a key with its default,
its bounds or choices and a one-line doc (`key`). A TOML file plus `--set section.key=value`
overrides becomes a validated `Config`; anything not a field is an error that names the key and the
nearest valid one. The README's key table is checked against these fields (tests/test_config.py).

The `[module]` section holds `kind`, `preset` and any key the chosen kind reads (modules/registry.py):
a key left out takes the kind's preset value, so only the keys a config sets are kept (`ModuleConfig.overrides`).
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import tomli_w

from .classify.registry import classifier_networks
from .errors import FedFactoryError
from .modules.fileformat import check_client_id
from .modules.registry import config_keys, get_kind, key_rules, module_kinds, samplers


def key(default, doc: str, *, choices: tuple = (), low=None, high=None, positive: bool = False):
    """A config key: its default, a one-line doc, and the values it may take (inclusive bounds)."""
    meta = {"doc": doc, "choices": choices, "low": low, "high": high, "positive": positive}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    name: str = key("fashion-mnist", "a data set (README 'Data sets'), npz:FILE, or a site's folder")
    root: str = key("", "folder (or file) override; empty = the data set's default location")
    size: int = key(0, "resize to size x size pixels; 0 = the data set's default", low=0)
    download: bool = key(False, "MedMNIST: download a missing file with the medmnist package")
    train_per_class: int = key(0, "cap on real training images per class (0 = all): toy runs and tests", low=0)
    test_per_class: int = key(0, "cap on test images per class (0 = all)", low=0)
    classes: list = key([], "the federation's class list, in order (a class's id is its place); empty = the data set's")
    channels: int = key(0, "site folders: 1 (grey) or 3 (colour); 0 = grey if every image is grey", choices=(0, 1, 3))


@dataclass(frozen=True)
class PartitionConfig:
    scheme: str = key("silos", "silos, pathological:K, dirichlet:ALPHA, iid or natural (README 'Partitions')")
    clients: int = key(10, "simulated sites", positive=True)
    min_size: int = key(10, "dirichlet: the smallest site", low=0)
    exclude: list = key([], "client ids left out of the federation (e.g. to check unlearning)")


@dataclass(frozen=True)
class ModuleConfig:
    kind: str = key("diffusion", "a registered kind: diffusion, cvae or a plugin's")
    preset: str = key("cpu", "the kind's network and budgets: cpu, gpu (minutes on one GPU) or paper (the paper's scale)")
    # The kind's own keys that the config sets (channels, budget_images, sampler, the cVAE's beta, ...);
    # the others take the preset's value. In TOML they sit in [module] beside kind and preset.
    overrides: dict = field(default_factory=dict, metadata={"doc": "the kind's keys the config sets"})


@dataclass(frozen=True)
class FactoryConfig:
    per_class: int = key(1000, "synthetic images per class", positive=True)
    aggregation: str = key("weighted", "how a shared class is split over modules", choices=("weighted", "uniform"))
    missing_classes: str = key("error", "a class that no module covers fails the run (error) or is left out (drop)", choices=("error", "drop"))
    keep_shards: bool = key(True, "keep each draw in RUN_DIR/synthetic/: resume and unlearn reuse it")
    max_share: float = key(1.0, "the most of a class's synthetic images one module supplies while others hold it",
                           low=0.01, high=1.0)
    check_samples: int = key(100, "images per (module, class) with which modules sharing a class check each other (0 = off)",
                             low=0, high=100_000)
    outliers: str = key("flag", "a (module, class) the check flags is only reported, or left out of synthesis",
                        choices=("flag", "drop"))


@dataclass(frozen=True)
class ClassifierConfig:
    mode: str = key("server", "server: one classifier on the synthetic set; local: a Product of the sites' experts", choices=("server", "local"))
    preset: str = key("cpu", "the network (classify/registry.py): cpu, gpu (ResNet-18-like) or a plugin's")
    width: int = key(0, "base channels (0 = preset)", low=0)
    budget_images: int = key(300_000, "training images seen (same budget for every baseline)", positive=True)
    batch_size: int = key(128, "images per step", positive=True)
    optimizer: str = key("sgd", "sgd (with a cosine schedule) or adamw", choices=("sgd", "adamw"))
    lr: float = key(0.05, "peak learning rate", positive=True)
    weight_decay: float = key(5e-4, "weight decay", low=0.0)
    augment: str = key("auto", "the augmentation: auto (by data set), natural, dihedral or none",
                       choices=("auto", "natural", "dihedral", "none"))
    blur: float = key(0.0, "random Gaussian blur, sigma ~ U(0, blur) px (0 = off): against generator artifacts", low=0.0)
    label_smoothing: float = key(0.0, "target mass spread uniformly over the classes (0 = off)", low=0.0, high=0.5)
    mixup: float = key(0.0, "mixup's Beta(a, a) parameter (0 = off)", low=0.0)
    ema_halflife_images: int = key(0, "the returned network is an EMA of the weights with this half-life (0 = off)", low=0)
    missing_experts: str = key("error", "local mode, a site sent no expert: the run fails (error), or takes the Product of the others (drop)",
                               choices=("error", "drop"))


@dataclass(frozen=True)
class FederationConfig:
    on_node_failure: str = key("fail", "a node that errs, stays silent or sends a refused module fails the run, or is left out (continue)",
                               choices=("fail", "continue"))
    clients: list = key([], "the roster: client ids allowed to upload (empty = any valid id, once each)")
    roster: str = key("", "the consortium's agreement (roster.py): each site's classes, counts and key")
    max_parameters: int = key(100_000_000, "a module's declared network, counted before anything is built", positive=True)
    max_channels: int = key(1024, "the widest layer a module may declare", positive=True)
    max_resolution: int = key(512, "the largest image side a module may declare", positive=True)
    max_count: int = key(10_000_000, "real images a module may claim per class", positive=True)
    max_module_bytes: int = key(1 << 30, "the largest module file accepted", positive=True)


@dataclass(frozen=True)
class PrivacyConfig:
    holdout: float = key(0.1, "share of each class held out of module training as the site's audit set (0 = no audit)",
                         low=0.0, high=0.5)
    audit_samples: int = key(200, "generated images per class that the audit measures", low=1, high=100_000)
    max_copy_rate: float = key(0.05, "share of generated images that are near-copies (d1/d2 < 1/3) a module may have",
                               low=0.0, high=1.0)
    max_closer_to_train: float = key(0.6, "share of generated images nearer a training than a held-out image",
                                     low=0.5, high=1.0)
    max_mia_auc: float = key(0.6, "AUC of the loss-threshold membership attack", low=0.5, high=1.0)
    significance: float = key(0.001, "level of the two tests (closer-to-train, attack) before a module is refused",
                              low=1e-12, high=0.5)
    enforce: bool = key(True, "a module that fails its audit is not uploaded (false: it is, with a warning)")
    epsilon: float = key(0.0, "DP-SGD: target epsilon (0 = no DP unless noise_multiplier is set)", low=0.0, high=1e6)
    noise_multiplier: float = key(0.0, "DP-SGD: noise multiplier instead of a target epsilon", low=0.0, high=1e3)
    delta: float = key(0.0, "DP-SGD: delta (0 = 1 / (10 N), below 1/N for a site of N images)", low=0.0, high=0.5)
    max_grad_norm: float = key(1.0, "DP-SGD: per-sample gradient clip norm", low=1e-9, high=1e9)
    accountant: str = key("prv", "DP-SGD: the privacy accountant", choices=("prv", "rdp"))
    noise_multiplicity: int = key(1, "DP-SGD: noise levels per image per step (DPDM), no extra privacy cost",
                                  low=1, high=64)

    def dp(self) -> dict | None:
        """The DP-SGD settings a module trains under, or None without DP."""
        if self.epsilon <= 0 and self.noise_multiplier <= 0:
            return None
        return {k: getattr(self, k) for k in ("epsilon", "noise_multiplier", "delta", "max_grad_norm",
                                               "accountant", "noise_multiplicity")}


@dataclass(frozen=True)
class QualityConfig:
    reference_budget: int = key(50_000, "images that train the feature classifier on the run's real training data "
                                        "(0 = no report)", low=0, high=10**10)
    max_images: int = key(1000, "synthetic and real images per (module, class) that are measured", low=10, high=10**6)
    k: int = key(5, "nearest neighbours for precision, recall, density and coverage", low=1, high=100)


@dataclass(frozen=True)
class BaselinesConfig:
    rounds: int = key(30, "communication rounds", positive=True)
    local_epochs: int = key(1, "local epochs per round", positive=True)
    lr: float = key(0.05, "plain SGD's learning rate, as the algorithms' papers use", positive=True)
    fraction: float = key(1.0, "clients per round", positive=True)
    mu: float = key(0.01, "FedProx proximal weight")
    alpha: float = key(0.01, "FedDyn regulariser")
    eval_every: int = key(1, "rounds between test evaluations (the learning curve)", positive=True)
    central_blur: float = key(0.0, "centralized: the blur of its recipe (classifier.blur is against synthetic "
                                   "artifacts; real images train best without)", low=0.0)
    central_budget: int = key(0, "centralized: training images seen (0 = classifier.budget_images)", low=0)


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = key("auto", "where torch runs (auto: a GPU if there is one)", choices=("auto", "cpu", "cuda"))
    bf16: str = key("auto", "bf16 autocast (auto: on where it is faster)", choices=("auto", "on", "off"))
    threads: int = key(0, "torch CPU threads (0 = all cores; with parallel_clients, cores / workers each)", low=0)
    parallel_clients: int = key(0, "client modules trained at once, in separate processes (0 = automatic)", low=0)
    compile: bool = key(False, "torch.compile on GPU")
    deterministic: bool = key(True, "GPU: deterministic kernels (same GPU, driver and torch give the same bits)")
    progress: bool = key(True, "progress bars")


@dataclass(frozen=True)
class Config:
    seed: int = key(0, "one seed for the whole run: partitions, modules, synthesis, classifier")
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    module: ModuleConfig = field(default_factory=ModuleConfig)
    factory: FactoryConfig = field(default_factory=FactoryConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        """The config as TOML holds it: [module]'s set keys beside kind and preset."""
        out = dataclasses.asdict(self)
        out["module"] = {"kind": self.module.kind, "preset": self.module.preset, **self.module.overrides}
        return out

    def replace(self, values: dict) -> Config:
        """A copy with {"section.key": value} changed, validated as a config file's values are."""
        data = self.to_dict()
        for dotted, value in values.items():
            node, (*sections, leaf) = data, dotted.split(".")
            for s in sections:
                if not isinstance(node.setdefault(s, {}), dict):
                    raise _unknown(dotted)
                node = node[s]
            node[leaf] = value
        return from_dict(data)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "seed"}


def fields_of(section: str) -> dict[str, dataclasses.Field]:
    """A section's keys (its dataclass fields); for [module], kind and preset (the kinds' keys: `config_keys`)."""
    return {f.name: f for f in dataclasses.fields(SECTIONS[section]) if f.name != "overrides"}


def all_keys() -> list[str]:
    """Every dotted key a config may hold, the module keys of every registered kind included."""
    keys = ["seed"] + [f"{s}.{k}" for s in SECTIONS for k in fields_of(s)]
    return keys + [f"module.{k}" for k in config_keys() if k not in ("kind", "preset")]


def _unknown(key: str) -> FedFactoryError:
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return FedFactoryError(f"unknown config key {key!r}{hint}")


def _coerce(key: str, value, default):
    """Check a value against its default's type; ints are accepted where floats are expected."""
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
        value = list(value)
    return value


def _check_bounds(key: str, value, meta) -> None:
    low, high = meta["low"], meta["high"]
    if meta["choices"] and value not in meta["choices"]:
        raise FedFactoryError(f"config key {key!r} must be one of {', '.join(map(str, meta['choices']))}; got {value!r}")
    if meta["positive"] and value <= 0:
        raise FedFactoryError(f"config key {key!r} must be > 0; got {value!r}")
    if low is not None and high is not None and not low <= value <= high:
        raise FedFactoryError(f"config key {key!r} must be in [{low:g}, {high:g}]; got {value!r}")
    if low is not None and high is None and value < low:
        raise FedFactoryError(f"config key {key!r} must be >= {low:g}; got {value!r}")


def _section(name: str, values: dict):
    """One section's dataclass from its TOML table: every key known, typed and within its bounds."""
    if not isinstance(values, dict):
        raise FedFactoryError(f"config key {name!r} is a section; give it as [{name}]")
    fields, kw, extra = fields_of(name), {}, {}
    kind_keys = config_keys() if name == "module" else {}
    for k, v in values.items():
        dotted = f"{name}.{k}"
        if isinstance(v, dict):
            raise _unknown(dotted)
        if k in fields:
            f = fields[k]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw[k] = _coerce(dotted, v, default)
            _check_bounds(dotted, kw[k], f.metadata)
        elif k in kind_keys:
            extra[k] = _coerce(dotted, v, kind_keys[k])
        else:
            raise _unknown(dotted)
    return SECTIONS[name](**kw, overrides=extra) if name == "module" else SECTIONS[name](**kw)


def from_dict(data: dict) -> Config:
    """A validated Config from a TOML document's dict."""
    unknown = [k for k in data if k != "seed" and k not in SECTIONS]
    if unknown:
        raise _unknown(unknown[0])
    seed = _coerce("seed", data.get("seed", 0), 0)
    cfg = Config(seed=seed, **{s: _section(s, data.get(s, {})) for s in SECTIONS})
    validate(cfg)
    return cfg


def _parse_value(text: str):
    """A TOML value (number, bool, list, quoted string); anything else is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict, overrides) -> dict:
    """`section.key=value` overrides written into a TOML document's dict (checked by `from_dict`)."""
    for assignment in overrides:
        dotted, sep, text = assignment.partition("=")
        dotted = dotted.strip()
        if not sep or not dotted:
            raise FedFactoryError(f"--set expects key=value, got {assignment!r}")
        *sections, leaf = dotted.split(".")
        if len(sections) > 1 or (sections and sections[0] not in SECTIONS) or (not sections and leaf != "seed"):
            raise _unknown(dotted)
        node = data.setdefault(sections[0], {}) if sections else data
        if not isinstance(node, dict):
            raise _unknown(dotted)
        node[leaf] = _parse_value(text.strip())
    return data


def load_config_text(text: str, overrides=()) -> Config:
    """A config from TOML text (as the Flower ServerApp sends it)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FedFactoryError(f"config is not valid TOML: {e}") from None
    return from_dict(apply_overrides(data, overrides))


def load_config(path: str | Path | None = None, overrides=()) -> Config:
    """The run's config: a TOML file (none: the defaults) with `--set section.key=value` overrides."""
    if path is None:
        return load_config_text("", overrides)
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FedFactoryError(f"config file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FedFactoryError(f"config file {path} is not valid TOML: {e}") from None
    return from_dict(apply_overrides(data, overrides))


def get(cfg: Config | dict, dotted: str, default=None):
    """A key's value by its dotted name, in a Config or its `to_dict()` (a module key the config leaves
    out: `default`)."""
    node = cfg.to_dict() if isinstance(cfg, Config) else cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _validate_module(m: ModuleConfig) -> None:
    """The kind and preset exist; a kind key set is checked by the rule its kind declares."""
    kinds = module_kinds()
    if m.kind not in kinds:
        raise FedFactoryError(f"config key 'module.kind' must be one of {', '.join(kinds)}; got {m.kind!r}")
    presets = tuple(get_kind(m.kind).presets)
    if m.preset not in presets:
        raise FedFactoryError(f"config key 'module.preset' must be one of {', '.join(presets)}; got {m.preset!r}")
    rules = key_rules()
    for leaf, value in m.overrides.items():
        if isinstance(value, (str, list, bool)):
            continue
        if rules.get(leaf) == "positive" and value <= 0:
            raise FedFactoryError(f"config key 'module.{leaf}' must be > 0 (leave it out for the preset's value); "
                                  f"got {value!r}")
        if rules.get(leaf) == "non-negative" and value < 0:
            raise FedFactoryError(f"config key 'module.{leaf}' must be >= 0; got {value!r}")
    if "sampler" in m.overrides and m.overrides["sampler"] not in samplers():
        raise FedFactoryError(f"config key 'module.sampler' must be {' or '.join(samplers())}; "
                              f"got {m.overrides['sampler']!r}")


def validate(cfg: Config) -> None:
    """What no single key says: the module kind's rules, DP with local mode, the client ids and classes."""
    _validate_module(cfg.module)
    if cfg.classifier.preset not in classifier_networks():
        raise FedFactoryError(f"config key 'classifier.preset' must be one of {', '.join(classifier_networks())}; "
                              f"got {cfg.classifier.preset!r}")
    if cfg.classifier.mode == "local" and cfg.privacy.dp():
        # Each site's expert is trained on its real images without DP and leaves the site: the epsilon would
        # cover the modules only, and a data-protection officer would read it as covering the run.
        raise FedFactoryError("differential privacy covers the modules only, and local mode also sends each site's "
                              "expert, a classifier trained on its real images without it: set "
                              "classifier.mode = \"server\" for a DP run (--set classifier.mode=server)")
    for cid in cfg.federation.clients:
        check_client_id(cid)
    classes = cfg.data.classes
    if any(not isinstance(c, str) or not c.strip() for c in classes) or len(set(classes)) != len(classes):
        raise FedFactoryError(f"data.classes must be distinct, non-empty class names; got {classes!r}")


def dumps(cfg: Config) -> str:
    """The resolved config as TOML (config.toml): loads back to the same Config."""
    return tomli_w.dumps(cfg.to_dict())


def _allowed(meta) -> str:
    if meta.get("choices"):
        return " \\| ".join(map(str, meta["choices"]))
    low, high = meta.get("low"), meta.get("high")
    if meta.get("positive"):
        return "> 0"
    if low is not None:
        return f"{low:g} to {high:g}" if high is not None else f">= {low:g}"
    return ""


def key_table() -> str:
    """The README's table of config keys, from the dataclasses and the registry (tests/test_config.py)."""
    rows = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    seed = dataclasses.fields(Config)[0]
    rows.append(f"| `seed` | `{seed.default}` | | {seed.metadata['doc']} |")
    for section in SECTIONS:
        for name, f in fields_of(section).items():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = tomli_w.dumps({"v": default})[4:].strip()
            registered = {"module.kind": module_kinds(), "classifier.preset": classifier_networks()}.get(f"{section}.{name}")
            allowed = " \\| ".join(registered) if registered else _allowed(f.metadata)
            rows.append(f"| `{section}.{name}` | `{shown}` | {allowed} | {f.metadata['doc']} |")
        if section == "module":
            for name, kinds in _kind_keys().items():
                rows.append(f"| `module.{name}` | the preset's | | read by {', '.join(kinds)} (optional) |")
    return "\n".join(rows)


def _kind_keys() -> dict[str, list[str]]:
    """Every module key a registered kind reads -> the kinds that read it."""
    out: dict[str, list[str]] = {}
    for kind, cls in module_kinds().items():
        for name in cls.config_keys():
            out.setdefault(name, []).append(kind)
    return out
