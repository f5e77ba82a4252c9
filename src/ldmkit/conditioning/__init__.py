"""Conditioning, one object per kind (LDM sec. 3.3): what encodes the condition, how a training batch provides
it, how a sampling request carries and validates it, and what the CLI and the web page ask for.

    from ldmkit.conditioning import kind_of
    kind = kind_of(cfg)                       # the ConditionKind of cfg.conditioning.kind
    module = kind.module(cfg)                 # the cond stage (None when it has no weights)
    source = kind.training_source(cfg, data, codec, encoder)   # keyword tensors for each training batch
    conds = kind.sample(cfg, codec, inputs, count, encode_prompts)  # a request's conditional / null tensors

Each kind lives in its own file and is listed once in `registry.py`; see docs/architecture.md for a new one.
"""

from .base import ConditionKind, ConditionRoles, SampleConditions
from .registry import KINDS, kind_of, register

__all__ = ["ConditionKind", "ConditionRoles", "SampleConditions", "KINDS", "kind_of", "register"]
