"""Drift metrics between a backend's output and the PyTorch reference.

Everything is accumulated in float64, a block of rows at a time, so a prefill's
``seq x 128256`` logits never need a full float64 copy in memory.

Non-finite values in the *actual* output never pass: the error metrics become
``inf``, ``cosine`` becomes ``-inf``, every row holding one counts as a top-1 and
top-5 disagreement with infinite KL, and ``nonfinite`` counts them (the gate fails
on any ``nonfinite > 0`` on its own). A non-finite *reference* cannot be judged
against and raises :class:`~mllama_export.errors.MllamaExportError`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from mllama_export.errors import MllamaExportError

__all__ = ["Metrics", "compare", "TOP_K"]

TOP_K = 5
_BLOCK_ELEMENTS = 1 << 22  # about 32 MiB of float64 per operand per block


@dataclass(frozen=True)
class Metrics:
    """How far ``actual`` is from ``reference``; dimensionless unless said otherwise.

    max_abs_error / mean_abs_error: max and mean of ``|a - r|`` (units of the tensor).
    rel_l2: ``||a - r||_2 / ||r||_2`` over the flattened tensors.
    cosine: cosine similarity of the flattened tensors, in [-1, 1].
    norm_ratio: ``||a||_2 / ||r||_2``; 1 means no overall scale drift.
    numel: number of elements compared.
    nonfinite: number of NaN/inf elements in ``actual`` (must be 0 to pass).

    Only for logits (``compare(..., logits=True)``; last axis = vocabulary, every
    other axis is a "row", i.e. one token position):

    rows: number of rows.
    top1_agreement: fraction of rows where ``argmax(actual) == argmax(reference)``
        (``numpy.argmax``: the lowest index wins a tie, as in greedy decoding), where a
        row also agrees when the reference scores the actual's choice within
        ``max(tie_tolerance, tie_margin * rms(reference row))`` of its own best: a
        near-tie that an error the limits already allow can flip is not a disagreement
        (both 0: exact argmax only).
    top5_agreement: top-5 accuracy of the actual logits with the reference's argmax
        as the label -- the standard top-k accuracy definition: the fraction of rows
        whose reference top-1 token is among the actual's 5 highest-scoring tokens,
        i.e. fewer than 5 tokens score *strictly* higher than it in ``actual``
        (ties are resolved in the token's favour). With a vocabulary of at most 5
        this is 1.
    kl_divergence: mean over rows of ``KL(softmax(reference) || softmax(actual))`` in
        nats, computed from float64 log-softmaxes (stable for any logit scale).
    """

    max_abs_error: float
    mean_abs_error: float
    rel_l2: float
    cosine: float
    norm_ratio: float
    numel: int
    nonfinite: int = 0
    rows: int | None = None
    top1_agreement: float | None = None
    top5_agreement: float | None = None
    kl_divergence: float | None = None

    @property
    def finite(self) -> bool:
        """True when ``actual`` held no NaN/inf."""
        return self.nonfinite == 0

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _as_float_array(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        try:  # extension float types such as ml_dtypes.bfloat16 convert cleanly
            arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise MllamaExportError(
                f"{name} has dtype {arr.dtype}; drift metrics need a real numeric array "
                "(float16/bfloat16/float32/float64 or integer)"
            ) from exc
    return arr


def compare(
    actual: np.ndarray,
    reference: np.ndarray,
    logits: bool,
    tie_tolerance: float = 0.0,
    tie_margin: float = 0.0,
) -> Metrics:
    """Compare a backend output with the reference output of the same shape.

    ``logits=True`` treats the last axis as the vocabulary and adds the top-1, top-5
    and KL metrics (see :class:`Metrics` for the exact definitions). ``tie_tolerance``
    (logit units) and ``tie_margin`` (a fraction of each reference row's RMS) say how
    close two reference logits must be for a top-1 flip between them to count as a tie.
    """
    a = _as_float_array(actual, "actual")
    r = _as_float_array(reference, "reference")
    if a.shape != r.shape:
        raise MllamaExportError(
            f"cannot compare outputs of different shapes: actual {a.shape}, reference {r.shape}"
        )
    if a.size == 0:
        raise MllamaExportError(f"cannot compare empty outputs (shape {a.shape})")
    if logits and a.ndim == 0:
        raise MllamaExportError("logits need at least one axis (the vocabulary); got a scalar")

    width = a.shape[-1] if a.ndim else 1
    a2 = a.reshape(-1, width)
    r2 = r.reshape(-1, width)
    n_rows = a2.shape[0]
    step = max(1, _BLOCK_ELEMENTS // width)

    sum_sq_diff = sum_abs_diff = sum_sq_a = sum_sq_r = dot = 0.0
    max_abs = 0.0
    nonfinite = ref_nonfinite = 0
    top1_hits = top5_hits = 0
    kl_sum = 0.0
    k = min(TOP_K, width)

    for start in range(0, n_rows, step):
        ab = a2[start : start + step].astype(np.float64)
        rb = r2[start : start + step].astype(np.float64)
        ref_bad = ~np.isfinite(rb)
        ref_nonfinite += int(ref_bad.sum())
        bad = ~np.isfinite(ab)
        nonfinite += int(bad.sum())
        row_ok = ~bad.any(axis=1)

        # Element metrics over the finite elements (the totals become inf below if any
        # element was not finite).
        ab_f = np.where(bad, 0.0, ab)
        rb_f = np.where(ref_bad, 0.0, rb)
        diff = ab_f - rb_f
        sum_sq_diff += float(np.sum(diff * diff))
        absd = np.abs(diff)
        sum_abs_diff += float(absd.sum())
        max_abs = max(max_abs, float(absd.max()))
        sum_sq_a += float(np.sum(ab_f * ab_f))
        sum_sq_r += float(np.sum(rb_f * rb_f))
        dot += float(np.sum(ab_f * rb_f))

        if logits and not ref_bad.any():
            ref_top = np.argmax(rb, axis=1)
            act_top = np.argmax(ab_f, axis=1)
            ref_best = np.take_along_axis(rb, ref_top[:, None], axis=1)[:, 0]
            ref_at_act = np.take_along_axis(rb, act_top[:, None], axis=1)[:, 0]
            tol = np.maximum(tie_tolerance, tie_margin * np.sqrt(np.mean(rb * rb, axis=1)))
            agree = (ref_top == act_top) | (ref_at_act >= ref_best - tol)
            top1_hits += int(np.sum(agree & row_ok))
            at_ref = np.take_along_axis(ab_f, ref_top[:, None], axis=1)
            higher = np.sum(ab_f > at_ref, axis=1)
            top5_hits += int(np.sum((higher < k) & row_ok))
            kl_rows = _kl_rows(rb, ab_f)
            kl_sum += float(np.sum(kl_rows[row_ok])) + (math.inf if not row_ok.all() else 0.0)

    if ref_nonfinite:
        raise MllamaExportError(
            f"the reference output holds {ref_nonfinite} NaN/inf value(s) of {r.size}; "
            "drift cannot be measured against it -- check the reference run "
            "(checkpoint, dtype, inputs) before the backend"
        )

    norm_a, norm_r = math.sqrt(sum_sq_a), math.sqrt(sum_sq_r)
    if nonfinite:
        inf = math.inf
        base = dict(max_abs_error=inf, mean_abs_error=inf, rel_l2=inf, cosine=-inf, norm_ratio=inf)
    else:
        err = math.sqrt(sum_sq_diff)
        if norm_r > 0:
            rel_l2 = err / norm_r
            norm_ratio = norm_a / norm_r
        else:  # an all-zero reference: only an all-zero output is right
            rel_l2 = 0.0 if err == 0 else math.inf
            norm_ratio = 1.0 if norm_a == 0 else math.inf
        if norm_a > 0 and norm_r > 0:
            cosine = max(-1.0, min(1.0, dot / (norm_a * norm_r)))
        else:
            cosine = 1.0 if norm_a == norm_r == 0 else 0.0
        base = dict(
            max_abs_error=max_abs,
            mean_abs_error=sum_abs_diff / a.size,
            rel_l2=rel_l2,
            cosine=cosine,
            norm_ratio=norm_ratio,
        )

    extra: dict[str, float | int | None] = {}
    if logits:
        extra = dict(
            rows=n_rows,
            top1_agreement=top1_hits / n_rows,
            top5_agreement=top5_hits / n_rows,
            kl_divergence=kl_sum / n_rows,
        )
    return Metrics(numel=int(a.size), nonfinite=nonfinite, **base, **extra)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def _kl_rows(ref: np.ndarray, act: np.ndarray) -> np.ndarray:
    """``KL(softmax(ref) || softmax(act))`` per row, float64, clamped at 0 (rounding)."""
    log_p = _log_softmax(ref)
    log_q = _log_softmax(act)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    return np.maximum(kl, 0.0)
