"""The one mechanism behind every backbone key map (`keymaps` for PVT v1, `keymaps_v2` for PVT v2): a format is a
table from native module names to that format's module names, turned into `Rule`s that parse a source key into
its native key. Placeholders: ``{s}`` stage 0..3, ``{i}`` = s + 1, ``{j}`` block within its stage, ``{last}`` the
last stage."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

# Format names shared by both families.
NATIVE = "native"
OFFICIAL = "official"
HUGGINGFACE = "huggingface"
MINDCV = "mindcv"

# Kinds of native modules.
AFFINE = "affine"  # Dense / Conv2d: weight, bias
NORM = "norm"  # LayerNorm: gamma, beta natively
PARAM = "param"  # a bare Parameter

_PLACEHOLDER = re.compile(r"\{(s|i|j|last)\}")


def _template_regex(template: str) -> re.Pattern:
    parts = _PLACEHOLDER.split(template)  # literal, name, literal, name, ...
    return re.compile("".join(f"(?P<{p}>\\d+)" if n % 2 else re.escape(p) for n, p in enumerate(parts)))


@dataclass(frozen=True)
class Rule:
    """One native parameter template and the source template(s) it comes from."""

    native: str
    sources: tuple[str, ...]
    native_re: re.Pattern
    source_res: tuple[re.Pattern, ...]


def _leaves(kind: str, norm_leaves: tuple[str, str]) -> list[tuple[str, str]]:
    """(native leaf, source leaf) pairs for one module kind; '' for a bare parameter."""
    if kind == PARAM:
        return [("", "")]
    if kind == NORM:
        return [(".gamma", "." + norm_leaves[0]), (".beta", "." + norm_leaves[1])]
    return [(".weight", ".weight"), (".bias", ".bias")]


def rules(modules: Mapping[str, str | tuple[str, ...]], norm_leaves: tuple[str, str],
           native_modules: Mapping[str, str]) -> tuple[Rule, ...]:
    """Rules for every native module the format has (a backbone-only format has no head)."""
    rules = []
    for native_module, kind in native_modules.items():
        if native_module not in modules:
            continue
        sources = modules[native_module]
        sources = sources if isinstance(sources, tuple) else (sources,)
        for native_leaf, source_leaf in _leaves(kind, norm_leaves):
            native = native_module + native_leaf
            source_keys = tuple(s + source_leaf for s in sources)
            rules.append(
                Rule(native, source_keys, _template_regex(native), tuple(_template_regex(s) for s in source_keys))
            )
    return tuple(rules)


def unchanged(state):
    return state


@dataclass(frozen=True)
class Format:
    name: str
    rules: tuple[Rule, ...]
    normalize: Callable[[str], str] = lambda key: key  # applied to a source key before matching
    family: str = "v1"  # PVT v1 or v2
    # Applied to the whole source dict before matching: splits or reshapes tensors that are laid out differently
    # (mmdetection's fused q/k/v projection, 1x1 convs standing for Linear layers).
    prepare: Callable[[Mapping[str, object]], Mapping[str, object]] = unchanged
    # The inverses, for writing the format (`from_native`): a renamed key back to the format's own spelling, and
    # the renamed dict back to the format's tensor layout.
    denormalize: Callable[[str], str] = lambda key: key
    unprepare: Callable[[Mapping[str, object]], Mapping[str, object]] = unchanged

    @property
    def label(self):
        return self.name if self.family == "v1" else f"{self.name} (PVT v2)"

    def parse(self, key: str) -> tuple[str, int, int] | None:
        """(native key, part, number of parts) for a source key, or None if no rule matches it."""
        key = self.normalize(key)
        for rule in self.rules:
            for part, regex in enumerate(rule.source_res):
                match = regex.fullmatch(key)
                index = indices(match.groupdict()) if match else None
                if index is not None:
                    return rule.native.format(**index), part, len(rule.sources)
        return None


def indices(groups: dict[str, str]) -> dict[str, int] | None:
    """Stage and block numbers from a match; None for a stage 0 in a format that counts stages from 1."""
    out = {}
    if "s" in groups:
        out["s"] = int(groups["s"])
    if "i" in groups:
        out["s"] = int(groups["i"]) - 1
    if "j" in groups:
        out["j"] = int(groups["j"])
    return None if out.get("s", 0) < 0 else out
