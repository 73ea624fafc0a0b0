"""Privacy at the site: the memorization audit (audit.py) and differentially private training (dp.py).

A module's manifest may carry a `privacy` block: {"audit": {...}, "dp": {...}}. It comes from a
peer, so `check_privacy_block` checks its shape before anything reads it.
"""

from __future__ import annotations

import math

AUDIT_FRACTIONS = ("copy_rate", "copy_rate_features", "closer_to_train", "train_vs_held_out_p", "mia_auc", "mia_p")


def _bad(where: str, why: str):
    from ..modules.fileformat import ModuleFileError

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
        from .dp import check_dp_block

        check_dp_block(block["dp"], where)
