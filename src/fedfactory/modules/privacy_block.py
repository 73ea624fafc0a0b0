"""The shape of a manifest's `privacy` block: {"audit": {...}, "dp": {...}}.

It comes from a peer, so `check_privacy_block` checks it before anything reads it. This is part of
the file format (load_module runs it), so it lives here; what the numbers mean, and how they are
measured or spent, is privacy/'s business.
"""

from __future__ import annotations

import math

from .fileformat import ModuleFileError

AUDIT_FRACTIONS = ("copy_rate", "copy_rate_features", "closer_to_train", "train_vs_held_out_p", "mia_auc", "mia_p")
DP_FIELDS = ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant")
ACCOUNTANTS = ("prv", "rdp")


def _bad(where: str, why: str):
    return ModuleFileError(f"{where}: privacy block: {why}")


def check_privacy_block(manifest: dict, where: str) -> None:
    """Refuse a malformed privacy block, and a DP claim without what makes it checkable."""
    block = manifest.get("privacy")
    if block is None:
        return
    if not isinstance(block, dict) or set(block) - {"audit", "dp"}:
        raise _bad(where, "must be an object with 'audit' and/or 'dp'")
    audit = block.get("audit")
    if audit is not None:
        if not isinstance(audit, dict):
            raise _bad(where, "'audit' must be an object")
        if not isinstance(audit.get("passed", True), bool):
            raise _bad(where, "audit.passed must be true or false")
        reasons = audit.get("reasons", [])
        if not isinstance(reasons, list) or not all(isinstance(r, str) and len(r) <= 1000 for r in reasons[:20]) \
                or len(reasons) > 20:
            raise _bad(where, "audit.reasons must be a short list of strings")
        for key in AUDIT_FRACTIONS:
            v = audit.get(key)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                      and math.isfinite(v) and 0 <= v <= 1):
                raise _bad(where, f"audit.{key} must be a number in [0, 1]")
    if "dp" in block:
        check_dp_block(block["dp"], where)


def check_dp_block(block, where: str) -> None:
    """Refuse a DP claim that does not state (or states nonsense for) what makes it checkable."""
    if not isinstance(block, dict) or any(block.get(k) is None for k in DP_FIELDS):
        raise _bad(where, f"a DP claim must state {', '.join(DP_FIELDS)}")

    def number(key, ok, what):
        v = block[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise _bad(where, f"dp.{key} must be {what}; got {str(v)[:40]!r}")

    number("epsilon", lambda v: v > 0, "a finite number > 0")
    number("delta", lambda v: 0 < v < 1, "a number in (0, 1)")
    number("noise_multiplier", lambda v: v > 0, "a finite number > 0")  # no noise: no finite epsilon
    number("max_grad_norm", lambda v: v > 0, "a finite number > 0")
    number("sample_rate", lambda v: 0 < v <= 1, "a number in (0, 1]")
    if isinstance(block["steps"], bool) or not isinstance(block["steps"], int) or block["steps"] < 1:
        raise _bad(where, f"dp.steps must be a positive integer; got {str(block['steps'])[:40]!r}")
    if block["accountant"] not in ACCOUNTANTS:
        raise _bad(where, f"dp.accountant must be one of {', '.join(ACCOUNTANTS)}; got {str(block['accountant'])[:40]!r}")
    k = block.get("noise_multiplicity", 1)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise _bad(where, f"dp.noise_multiplicity must be a positive integer; got {str(k)[:40]!r}")
