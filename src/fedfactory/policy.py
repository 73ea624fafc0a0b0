"""A site's policy: what a hospital lets a coordinator ask of it. Held and read by the site only.

    policy = load_policy("site-policy.toml")
    cfg = policy.apply(request_cfg)                     # the site's own [runtime] over the request
    policy.check(cfg, training_images=800)              # refused: one line naming the key and the bound

The coordinator sends a config; the site decides. A request that breaks the policy is refused before
anything is trained or sent. Without a policy file a site does what the config says (a simulation).

    # site-policy.toml
    may_set = ["*"]            # keys the coordinator may change from fedfactory's defaults (fnmatch patterns)
    max_passes = 50            # module.budget_images / the site's training images, at most (0 = no bound)
    max_budget_images = 0      # module.budget_images, at most (0 = no bound)
    require_audit = true       # privacy.enforce on, privacy.holdout at least [audit] holdout
    require_dp = false         # a module without DP-SGD is refused
    max_epsilon = 0            # a DP module may spend at most this epsilon (0 = no bound)
    allow_expert = false       # local mode sends an expert trained on the site's real images: may it?
    allow_evaluation = true    # may the site evaluate the final classifier on its test images (counts only)?
    keep_dir = "/data/fedfactory-kept"   # what the site sent and received, and its log
    [audit]                    # the loosest audit the site accepts: a request may be stricter, never looser
    holdout = 0.1
    max_copy_rate = 0.05
    max_closer_to_train = 0.6
    max_mia_auc = 0.6
    significance = 0.001
    [runtime]                  # this machine's settings, applied over the request's
    threads = 2
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from .config import Config, RuntimeConfig, all_keys, dumps, get, load_config
from .errors import FedFactoryError
from .privacy import dp as dpsgd
from .site import new_module

AUDIT_DEFAULTS = {"holdout": 0.1, "max_copy_rate": 0.05, "max_closer_to_train": 0.6, "max_mia_auc": 0.6,
                  "significance": 0.001}
# An audit threshold is looser when the request's value is above the policy's, or (significance) below it.
LOOSER_BELOW = ("holdout", "significance")
RUNTIME_KEYS = ("device", "bf16", "threads", "progress")


class PolicyRefusal(FedFactoryError):
    """A coordinator's request that the site's policy does not allow."""


@dataclass(frozen=True)
class SitePolicy:
    may_set: tuple[str, ...] = ("*",)
    max_passes: float = 0.0
    max_budget_images: int = 0
    require_audit: bool = True
    require_dp: bool = False
    max_epsilon: float = 0.0
    allow_expert: bool = False
    allow_evaluation: bool = True
    keep_dir: str = ""
    audit: dict = field(default_factory=lambda: dict(AUDIT_DEFAULTS))
    runtime: dict = field(default_factory=dict)
    sha256: str = ""  # of the policy file's bytes

    def apply(self, request: Config) -> Config:
        """The site's effective config: the coordinator's request with the site's own [runtime] over it."""
        return request.replace({f"runtime.{k}": v for k, v in self.runtime.items()})

    def check(self, cfg: Config, training_images: int | None = None, phase: str = "module") -> None:
        """Raise PolicyRefusal naming the first key that breaks the policy. `training_images`: the site's
        images that the module would train on (for max_passes and the DP budget)."""
        self._check_keys(cfg)
        if (cfg.classifier.mode == "local" or phase == "expert") and not self.allow_expert:
            raise PolicyRefusal('site policy refuses classifier.mode = "local": it would send an expert trained '
                                "on this site's real images, and allow_expert = false")
        if phase == "evaluate" and not self.allow_evaluation:
            raise PolicyRefusal("site policy refuses to evaluate the classifier on this site's test images "
                                "(allow_evaluation = false)")
        pv = cfg.privacy
        if self.require_audit:
            if not pv.enforce:
                raise PolicyRefusal("site policy refuses privacy.enforce = false: this site sends only modules "
                                    "that passed its audit (require_audit = true)")
            for key, bound in self.audit.items():
                value = getattr(pv, key)
                if (value < bound) if key in LOOSER_BELOW else (value > bound):
                    side = "at least" if key in LOOSER_BELOW else "at most"
                    raise PolicyRefusal(f"site policy refuses privacy.{key} = {value:g}: the audit's bound here is "
                                        f"{side} {bound:g} ([audit] {key})")
        dp = pv.dp() is not None
        if self.require_dp and not dp:
            raise PolicyRefusal("site policy refuses a module without differential privacy (require_dp = true): "
                                "set privacy.epsilon")
        if training_images is not None and phase == "module":
            self._check_budget(cfg, training_images, dp)

    def _check_keys(self, cfg: Config) -> None:
        values, defaults = cfg.to_dict(), Config().to_dict()
        for key in all_keys():
            if key.startswith("runtime."):
                continue  # the site's own machine: [runtime] decides, never a refusal
            value = get(values, key)  # a module key left out: None, the preset's value
            if value is not None and value != get(defaults, key) and not any(fnmatch.fnmatchcase(key, p) for p in self.may_set):
                raise PolicyRefusal(f"site policy refuses {key} = {json.dumps(value)[:60]}: the coordinator may set "
                                    f"only {', '.join(self.may_set) or 'nothing'} (may_set)")

    def _check_budget(self, cfg: Config, n: int, dp: bool) -> None:
        """The module's budget as the kind's preset resolves it, in images and in passes; a DP module's epsilon."""
        train = new_module(cfg, "policy-check").train_cfg
        budget = int(train["budget_images"])
        if self.max_budget_images and budget > self.max_budget_images:
            raise PolicyRefusal(f"site policy refuses module.budget_images = {budget:,}: at most "
                                f"{self.max_budget_images:,} here (max_budget_images)")
        if self.max_passes and budget > self.max_passes * n:
            raise PolicyRefusal(f"site policy refuses module.budget_images = {budget:,}: {budget / max(n, 1):,.1f} "
                                f"passes over this site's {n:,} training images, over max_passes = {self.max_passes:g} "
                                f"(at most {int(self.max_passes * n):,} images)")
        if dp and self.max_epsilon:
            spent = dpsgd.plan(cfg.privacy.dp(), n, int(train["batch_size"]), budget)["epsilon"]
            if spent > self.max_epsilon:
                raise PolicyRefusal(f"site policy refuses privacy.epsilon: this module would spend epsilon "
                                    f"{spent:.3g}, over max_epsilon = {self.max_epsilon:g}")

    def terms(self) -> dict:
        """The policy as a module's manifest records it (without the site's paths)."""
        return {k: v for k, v in asdict(self).items() if k != "keep_dir"}


def load_policy(path: str | Path) -> SitePolicy:
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = tomllib.loads(raw.decode())
    except FileNotFoundError:
        raise FedFactoryError(f"site policy {path} not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise FedFactoryError(f"site policy {path} is not a readable TOML file: {e}") from None
    fields = {f for f in SitePolicy.__dataclass_fields__ if f != "sha256"}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise FedFactoryError(f"site policy {path}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(fields))}")
    base = SitePolicy()
    kw = {}
    for key, value in data.items():
        default = getattr(base, key)
        if key == "may_set":
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise FedFactoryError(f"site policy {path}: may_set must be a list of key patterns")
            value = tuple(value)
        elif key in ("audit", "runtime"):
            value = _section(path, key, value, AUDIT_DEFAULTS if key == "audit" else
                             {k: getattr(RuntimeConfig(), k) for k in RUNTIME_KEYS})
            value = {**AUDIT_DEFAULTS, **value} if key == "audit" else value
        elif isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, type(default) if not
                                                                                 isinstance(default, float) else (int, float)):
            raise FedFactoryError(f"site policy {path}: {key} must be {type(default).__name__}, got {value!r}")
        elif isinstance(default, (int, float)) and value < 0:
            raise FedFactoryError(f"site policy {path}: {key} must be >= 0, got {value!r}")
        kw[key] = value
    policy = SitePolicy(**kw, sha256=hashlib.sha256(raw).hexdigest())
    load_config(None, [f"runtime.{k}={json.dumps(v)}" for k, v in policy.runtime.items()])  # valid values only
    return policy


def _section(path: Path, name: str, value, allowed: dict) -> dict:
    if not isinstance(value, dict):
        raise FedFactoryError(f"site policy {path}: [{name}] must be a table")
    for k, v in value.items():
        if k not in allowed:
            raise FedFactoryError(f"site policy {path}: unknown key {name}.{k}; the keys are {', '.join(allowed)}")
        if isinstance(allowed[k], bool) != isinstance(v, bool) or not isinstance(v, (int, float, str)) or \
                isinstance(v, str) != isinstance(allowed[k], str):
            raise FedFactoryError(f"site policy {path}: {name}.{k} must be like {allowed[k]!r}, got {v!r}")
    return dict(value)


def accept(policy: SitePolicy | None, request: Config, client_id: str, phase: str, keep_dir: str | Path = "",
           training_images: int | None = None) -> Config:
    """A coordinator's request at the site: the effective config (the request, then the policy's
    [runtime]), or PolicyRefusal. Either way the site's log (in keep_dir) records what was asked and done."""
    cfg = policy.apply(request) if policy else request
    entry = {"client": client_id, "phase": phase, "request_sha256": config_digest(request),
             "policy_sha256": policy.sha256 if policy else None}
    try:
        if policy:
            policy.check(cfg, training_images, phase)
    except PolicyRefusal as e:
        site_log(keep_dir, client_id, "refused", **entry, reason=str(e))
        raise
    site_log(keep_dir, client_id, "accepted", **entry, effective_config=cfg.to_dict())
    return cfg


def record_terms(module, policy: SitePolicy | None, cfg: Config) -> None:
    """The module's manifest records the site's policy and the config the site trained under."""
    if policy:
        module.site = {"policy": policy.terms(), "policy_sha256": policy.sha256, "config": cfg.to_dict(),
                       "config_sha256": config_digest(cfg)}


def site_log(keep_dir: str | Path, client_id: str, event: str, **fields) -> None:
    """The site's own log (one JSON line per request: what was asked, what the site did)."""
    if not keep_dir:
        return
    path = Path(keep_dir) / f"{client_id}-log.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                            "event": event, **fields}) + "\n")


def config_digest(cfg: Config) -> str:
    return hashlib.sha256(dumps(cfg).encode()).hexdigest()
