"""Privacy at the site: the memorization audit (audit.py) and differentially private training (dp.py).

A module's manifest may carry a `privacy` block: {"audit": {...}, "dp": {...}}. It comes from a
peer, so `check_privacy_block` (modules/privacy_block.py: the file format checks it on every load)
checks its shape before anything reads it; it is re-exported here.

DP-SGD is a trainer handed to `GenerativeModule.fit` (`dp.DPTrainer`): this package sits above
modules/, which never imports it.
"""

from __future__ import annotations

from ..modules.privacy_block import AUDIT_FRACTIONS, check_privacy_block
from ..modules.training import register_trainer
from .dp import DPTrainer

# A module built with `dp=` settings and fitted without an explicit trainer gets this one.
register_trainer("dp", DPTrainer)

__all__ = ["AUDIT_FRACTIONS", "DPTrainer", "check_privacy_block"]
