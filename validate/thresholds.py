"""Drift limits per precision and kind of stage, read from a versioned JSON file.

Schema (the packaged ``thresholds.json`` is the example)::

    {
      "version": "2026.1",                 # required, non-empty string
      "description": "...",                # optional
      "precisions": {                      # required, at least one precision
        "fp16": {                          # fp32 | fp16 | bf16 | fp8
          "vision": {"max_rel_l2": 1e-2, "min_cosine": 0.9999},
          "logits": {"max_rel_l2": 1e-2, "min_cosine": 0.9999,
                     "min_top1_agreement": 0.98, "min_top5_agreement": 0.995,
                     "max_kl_divergence": 1e-3, "max_abs_error": 0.25}
        }
      }
    }

``vision`` judges the cross-attention K/V tensors, ``logits`` the prefill and decode
logits. ``max_abs_error`` is optional; every other limit of a stage is required.
``top1_tie_margin`` (logits, optional) is no limit but a parameter of top-1 agreement: a
flip counts as a tie when the reference's two logits are within this fraction of the
row's RMS, or within ``max_abs_error`` (``metrics.compare``). A user file replaces the
packaged one as a whole (it may list fewer precisions or stages; judging one it lacks is
an error). Limits are inclusive.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType

from mllama_export.errors import MllamaExportError
from mllama_export.graphs import strict
from mllama_export.graphs.choices import PRECISIONS

from .metrics import Metrics

__all__ = [
    "Check",
    "KINDS",
    "LIMITS",
    "Thresholds",
    "fmt_value",
    "load_thresholds",
]

KINDS = ("vision", "logits")

# limit key -> (Metrics attribute, bound); bound "max": value <= limit, "min": value >= limit.
_LIMIT_METRIC: dict[str, tuple[str, str]] = {
    "max_rel_l2": ("rel_l2", "max"),
    "min_cosine": ("cosine", "min"),
    "max_abs_error": ("max_abs_error", "max"),
    "min_top1_agreement": ("top1_agreement", "min"),
    "min_top5_agreement": ("top5_agreement", "min"),
    "max_kl_divergence": ("kl_divergence", "max"),
}
_REQUIRED = {
    "vision": ("max_rel_l2", "min_cosine"),
    "logits": (
        "max_rel_l2",
        "min_cosine",
        "min_top1_agreement",
        "min_top5_agreement",
        "max_kl_divergence",
    ),
}
_OPTIONAL = {"vision": ("max_abs_error",), "logits": ("max_abs_error",)}
# Keys that parameterize a metric instead of limiting one (see metrics.compare).
_PARAMETERS = {"vision": (), "logits": ("top1_tie_margin",)}
LIMITS = {kind: _REQUIRED[kind] + _OPTIONAL[kind] for kind in KINDS}
_KEYS = {kind: LIMITS[kind] + _PARAMETERS[kind] for kind in KINDS}
# Metrics bounded by 1 at best: their budget is measured as the shortfall from 1.
_UNIT_METRICS = {"cosine", "top1_agreement", "top5_agreement"}
# Metrics that grow with the square of the error (1 - cos ~ rel_l2**2 / 2, KL ~ var / 2).
_QUADRATIC_METRICS = {"cosine", "kl_divergence"}


@dataclass(frozen=True)
class Check:
    """One metric held against one limit.

    ``ratio`` is how far along its limit the value is, comparable across metrics
    (at most 1 passes; NaN and non-finite values give ``inf``): ``value / limit`` for a
    ``max`` limit, ``(1 - value) / (1 - limit)`` for a ``min`` limit on a metric whose
    perfect value is 1 (top-k agreement). Metrics that grow with the *square* of the
    underlying error -- KL divergence and the cosine shortfall ``1 - cosine`` -- use
    the square root of that ratio, so that an error twice its budget reads as 2 for
    rel_l2, cosine and KL alike and ``worst`` is not always the quadratic metric.
    """

    metric: str
    bound: str  # "max" or "min"
    value: float
    limit: float

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value <= self.limit if self.bound == "max" else self.value >= self.limit

    @property
    def ratio(self) -> float:
        v, lim = self.value, self.limit
        if math.isnan(v):
            return math.inf
        if self.bound == "max":
            used, budget = v, lim
        elif self.metric in _UNIT_METRICS:
            used, budget = 1.0 - v, 1.0 - lim
        else:
            used, budget = lim - v, 0.0  # generic min: anything below the limit fails
        if math.isinf(used):
            return math.inf if used > 0 else 0.0
        if budget <= 0:
            return 0.0 if used <= 0 else math.inf
        ratio = max(used, 0.0) / budget
        return math.sqrt(ratio) if self.metric in _QUADRATIC_METRICS else ratio

    @property
    def op(self) -> str:
        return "<=" if self.bound == "max" else ">="

    def describe(self) -> str:
        """``rel_l2=3.2e-03 (limit <= 1e-04)``."""
        return f"{self.metric}={fmt_value(self.value)} (limit {self.op} {fmt_value(self.limit)})"

    def to_dict(self) -> dict[str, object]:
        return {
            "metric": self.metric,
            "bound": self.bound,
            "value": self.value,
            "limit": self.limit,
            "passed": self.passed,
            "ratio": self.ratio,
        }


def fmt_value(x: float) -> str:
    """A short, human-readable number that still tells 0.99999 from 1."""
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    if 0.9 < abs(x) < 1:
        digits = min(12, 2 - math.floor(math.log10(1 - abs(x))))
        return f"{x:.{digits}f}".rstrip("0")
    if x.is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.3g}"


@dataclass(frozen=True)
class Thresholds:
    version: str
    limits: Mapping[str, Mapping[str, Mapping[str, float]]]
    source: str = "packaged"
    description: str = field(default="", compare=False)

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self.limits)

    def limits_for(self, precision: str, kind: str) -> Mapping[str, float]:
        p = precision.lower()
        if p not in self.limits:
            raise MllamaExportError(
                f"no drift thresholds for precision {precision!r} in {self.source} "
                f"(version {self.version}); it has: {', '.join(self.limits) or 'none'}"
            )
        if kind not in self.limits[p]:
            raise MllamaExportError(
                f"no drift thresholds for stage kind {kind!r} at precision {p} in "
                f"{self.source}; it has: {', '.join(self.limits[p]) or 'none'}"
            )
        return self.limits[p][kind]

    def checks(self, metrics: Metrics, precision: str, kind: str) -> list[Check]:
        """Every limit of ``precision``/``kind`` held against ``metrics``.

        A ``nonfinite`` check (limit 0) comes first whenever ``actual`` held NaN/inf.
        """
        limits = self.limits_for(precision, kind)
        out: list[Check] = []
        if metrics.nonfinite:
            out.append(Check("nonfinite", "max", float(metrics.nonfinite), 0.0))
        for key, limit in limits.items():
            if key not in _LIMIT_METRIC:
                continue  # a parameter, not a limit
            attr, bound = _LIMIT_METRIC[key]
            value = getattr(metrics, attr)
            if value is None:
                raise MllamaExportError(
                    f"the {kind!r} limits include {key}, but these metrics have no {attr}: "
                    "compute logits metrics with compare(..., logits=True)"
                )
            out.append(Check(attr, bound, float(value), float(limit)))
        return out

    def ties(self, precision: str) -> dict[str, float]:
        """``compare``'s tie keywords for logits at ``precision``: a top-1 flip that an
        error within ``max_abs_error``, or within ``top1_tie_margin`` of the row's RMS,
        can cause is a tie, not a disagreement."""
        limits = self.limits_for(precision, "logits")
        return {
            "tie_tolerance": limits.get("max_abs_error", 0.0),
            "tie_margin": limits.get("top1_tie_margin", 0.0),
        }

    def judge(self, metrics: Metrics, precision: str, kind: str) -> list[Check]:
        """The limits ``metrics`` break; empty when the stage passes."""
        return [c for c in self.checks(metrics, precision, kind) if not c.passed]

    def to_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "source": self.source,
            "precisions": {p: {k: dict(v) for k, v in ks.items()} for p, ks in self.limits.items()},
        }


def load_thresholds(path: str | Path | None = None) -> Thresholds:
    """The packaged thresholds, or a user file with the same schema."""
    if path is None:
        text = resources.files("mllama_export.validate").joinpath("thresholds.json").read_text()
        source = "packaged thresholds.json"
    else:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MllamaExportError(f"thresholds file {str(p)!r} does not exist") from None
        except OSError as exc:
            raise MllamaExportError(f"cannot read thresholds file {str(p)!r}: {exc}") from exc
        source = str(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MllamaExportError(
            f"thresholds file {source} is not valid JSON: {exc.msg} "
            f"at line {exc.lineno} column {exc.colno}"
        ) from None
    return _parse(data, source)


def _nonempty(keyed_by: str) -> strict.Check:
    def check(value: object) -> dict:
        if not isinstance(value, dict) or not value:
            raise strict.Wrong(f"a non-empty object keyed by {keyed_by}")
        return value

    return check


_TOP = (
    strict.Key("version", strict.string, about='a non-empty string such as "2025.1"'),
    strict.Key("description", strict.text, default=""),
    strict.Key("precisions", _nonempty(f"precision ({', '.join(PRECISIONS)})")),
)
_PRECISION = tuple(
    strict.Key(p, _nonempty(f"stage kind ({', '.join(KINDS)})"), default=None) for p in PRECISIONS
)
_KIND = tuple(strict.Key(kind, strict.obj, default=None) for kind in KINDS)
_KIND_NOTE = " (vision = cross-attention K/V, logits = prefill and decode logits)"
_UNIT = strict.number(minimum=0, maximum=1)
_NON_NEGATIVE = strict.number(finite=True, minimum=0)


def _limit_key(key: str, kind: str) -> strict.Key:
    metric = _LIMIT_METRIC[key][0] if key in _LIMIT_METRIC else key
    check = _UNIT if metric in _UNIT_METRICS else _NON_NEGATIVE
    return strict.Key(key, check, default=strict.REQUIRED if key in _REQUIRED[kind] else None)


_LIMIT_KEYS = {kind: tuple(_limit_key(k, kind) for k in _KEYS[kind]) for kind in KINDS}


def _parse(data: object, source: str) -> Thresholds:
    where = f"thresholds file {source}"
    top = strict.read(where, data, _TOP, prefix=f"{where}: ")
    precisions = top["precisions"]
    strict.read(f"{where}: precisions", precisions, _PRECISION)
    limits: dict[str, Mapping[str, Mapping[str, float]]] = {}
    for precision, kinds in precisions.items():  # the file's order
        at = f"{where}: precisions.{precision}"
        strict.read(at, kinds, _KIND, note=_KIND_NOTE)
        limits[precision] = MappingProxyType(
            {
                kind: MappingProxyType(_parse_limits(values, kind, f"{at}.{kind}"))
                for kind, values in kinds.items()
            }
        )
    return Thresholds(
        version=top["version"],
        limits=MappingProxyType(limits),
        source=source,
        description=top["description"],
    )


def _parse_limits(values: object, kind: str, at: str) -> dict[str, float]:
    checked = strict.read(at, values, _LIMIT_KEYS[kind])
    return {key: checked[key] for key in strict.require_object(at, values)}  # the file's order
