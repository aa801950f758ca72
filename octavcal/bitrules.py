"""Which bit width each target gets: layer patterns, the first/last-layer rule (Appendix E.2), the
default. One home for calibration and QAT."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, replace

from .target import Target


@dataclass(frozen=True)
class BitRules:
    """``layer_bits``: (pattern, bits or None to skip), first match wins; a pattern matches a target id
    ``module:role`` or its module path (fnmatch). ``first_last_bits`` applies to the layers (weights and
    their inputs) of the first and last ``edges`` modules, in execution order."""

    bits: int
    layer_bits: tuple[tuple[str, int | None], ...] = ()
    first_last_bits: int | None = None
    edges: frozenset[str] = frozenset()

    def with_layer_order(self, targets: Iterable[Target]) -> BitRules:
        """These rules with ``edges`` set from the targets a forward pass met, in call order (a model
        whose forward cannot be watched gives its weights, in definition order)."""
        targets = list(dict.fromkeys(targets))
        order = [t.module for t in targets if t.is_layer and t.kind == "activation"]
        order = order or [t.module for t in targets if t.kind == "weight"]
        return replace(self, edges=frozenset({order[0], order[-1]}) if order else frozenset())

    def for_target(self, target: Target) -> int | None:
        """The target's bit width, None when it is skipped."""
        for pattern, bits in self.layer_bits:
            if fnmatch.fnmatchcase(target.id, pattern) or fnmatch.fnmatchcase(target.module, pattern):
                return bits
        if self.first_last_bits and target.module in self.edges and target.is_layer:
            return self.first_last_bits
        return self.bits

    def unmatched_patterns(self, ids: Iterable[str]) -> list[str]:
        """Layer patterns that match none of ``ids`` (a typo the user should hear about)."""
        ids = list(ids)
        return [
            pattern
            for pattern, _ in self.layer_bits
            if not any(
                fnmatch.fnmatchcase(t, pattern) or fnmatch.fnmatchcase(t.split(":")[0], pattern) for t in ids
            )
        ]
