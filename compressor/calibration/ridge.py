"""Streaming ridge least squares: Gram matrices accumulated batch by batch (float64), a ridge strength chosen on
held-out rows, and relative output errors computed from the Gram statistics alone.

Every fit is per convolution group: X [R, G, D] and Y [R, G, O] give M [G, D + 1, O] (the last row is the bias).
The ridge pulls towards the current weights W0, so a strong penalty returns them unchanged:
M = (XᵀX + λI)⁻¹ (XᵀY + λW0), with λ = alpha · trace(XᵀX) / D.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALPHAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 0.3, 1.0)
WIDE = 1024  # layers with more features per group try fewer alphas (each try is a D³ solve)
WIDE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0)
FOLDS = 2  # fold 0 fits, fold 1 (every fifth sample) chooses alpha and measures the errors


class GramStats:
    """XᵀX, XᵀY and YᵀY of a linear layer's sampled rows, kept separately for the fit fold and the check fold."""

    def __init__(self, groups: int, features: int, outputs: int):
        self.xx = np.zeros((FOLDS, groups, features + 1, features + 1))
        self.xy = np.zeros((FOLDS, groups, features + 1, outputs))
        self.yy = np.zeros((FOLDS, groups))
        self.rows = np.zeros(FOLDS, dtype=np.int64)

    def add(self, x: np.ndarray, y: np.ndarray, fold: np.ndarray) -> None:
        """Accumulate rows x [R, G, D] with targets y [R, G, O]; fold [R] is 0 or 1 per row."""
        ones = np.ones(x.shape[:2] + (1,))
        x = np.concatenate([x, ones], axis=2)
        for f in range(FOLDS):
            sel = fold == f
            if not sel.any():
                continue
            xf = np.ascontiguousarray(x[sel].transpose(1, 0, 2))
            yf = np.ascontiguousarray(y[sel].transpose(1, 0, 2))
            self.xx[f] += np.matmul(xf.transpose(0, 2, 1), xf)
            self.xy[f] += np.matmul(xf.transpose(0, 2, 1), yf)
            self.yy[f] += np.einsum("gro,gro->g", yf, yf)
            self.rows[f] += int(sel.sum())


@dataclass
class RidgeFit:
    """The refitted M, the chosen alpha and the relative output errors of W0 and of the refit on the check rows."""

    matrix: np.ndarray
    alpha: float
    error_before: float
    error_after: float
    checked_on: str


def solve(xx: np.ndarray, xy: np.ndarray, w0: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge solution towards w0 for each group (float64)."""
    d = xx.shape[-1] - 1
    trace = np.trace(xx[:, :d, :d], axis1=1, axis2=2) / max(d, 1)
    lam = alpha * np.maximum(trace, 1e-12)
    eye = np.eye(xx.shape[-1])[None]
    a = xx + lam[:, None, None] * eye
    b = xy + lam[:, None, None] * w0
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return np.matmul(np.linalg.pinv(a), b)


def squared_error(xx: np.ndarray, xy: np.ndarray, yy: np.ndarray, m: np.ndarray) -> float:
    """Σ‖XM − Y‖² from the Gram statistics (summed over groups)."""
    quad = float(np.sum(np.matmul(xx, m) * m))
    cross = float(np.sum(m * xy))
    return float(max(quad - 2.0 * cross + yy.sum(), 0.0))


def fit(stats: GramStats, w0: np.ndarray) -> RidgeFit:
    """Choose alpha on the check fold, then refit on all rows; errors are relative (‖XM − Y‖ / ‖Y‖) on the check fold."""
    fit_fold, check_fold = 0, 1
    if stats.rows[check_fold] == 0 or stats.rows[fit_fold] == 0:
        fit_fold = check_fold = int(np.argmax(stats.rows))
    checked_on = "held-out rows" if fit_fold != check_fold else "fitting rows"
    xx_c, xy_c, yy_c = stats.xx[check_fold], stats.xy[check_fold], stats.yy[check_fold]
    norm = max(float(yy_c.sum()), 1e-30)

    def rel(m: np.ndarray) -> float:
        return float(np.sqrt(squared_error(xx_c, xy_c, yy_c, m) / norm))

    before = rel(w0)
    best_alpha, best_error = ALPHAS[-1], np.inf
    for alpha in ALPHAS if stats.xx.shape[-1] - 1 <= WIDE else WIDE_ALPHAS:
        error = rel(solve(stats.xx[fit_fold], stats.xy[fit_fold], w0, alpha))
        if error < best_error:
            best_alpha, best_error = alpha, error
    matrix = solve(stats.xx.sum(axis=0), stats.xy.sum(axis=0), w0, best_alpha)
    return RidgeFit(matrix, best_alpha, before, best_error, checked_on)
