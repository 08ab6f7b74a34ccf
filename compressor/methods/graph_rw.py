"""graph-rw: random-walk filter importance and random-matrix layer rates (data-free, weights only).

Filters of one channel group are the nodes of a directed graph whose edges are the linear dependencies between
them (ridge leave-one-out regression of each filter on all others). A PageRank-style random walk on that graph
scores the filters: rarely visited ones are pruned first. The spikes of the symmetrized edge matrix above the
semicircle bulk edge score the layers (LIS); layers with more structure keep more of their filters.

The regression edges scale as α_ij ~ ||w_i|| / ||w_j||, so the walk drifts toward small-norm filters; the
scale-invariant variant (`rw_normalize=true`) scales every filter to unit norm before the regression, so only the
filters' directions (their linear dependencies) decide.

The data-aware variant (`rw_features=calib`, needs calibration data: `--calib`, or `--calib-count N` on
`compress train`) builds the same regression, walk and LIS on the channels' calibration feature maps instead of their
filters (compressor/calibration/features.py: what the consuming layers read, centred, sampled to a bounded length),
each scaled to unit norm (as rw_normalize does for filters). Groups with a channel no supported layer reads keep
their weight graph (a note says so). With calibration data the planner then uses these scores and graph-rw's own LIS
rates (calib_importance=off and calib_allocation=method are implied unless given; calibration/planning.py).

All math below is pure, vectorized float64 numpy on one group's filter matrix W [n filters, d weights].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from compressor.errors import CompressorError
from compressor.methods.registry import register
from compressor.engine.plan import MAX_RATE, Plan, PlanOptions, allocate, allocate_global, prunable_groups

if TYPE_CHECKING:
    from compressor.engine.analysis import Analysis

DENSE_SOLVE_MAX_N = 128
INVERSE_LEAF_N = 256


def ridge_regression_edges(filters: np.ndarray, rho_scale: float = 1e-3) -> np.ndarray:
    """Ridge leave-one-out regression coefficients α [n, n] of every filter on all the others, at once.

    Row i holds α_i = argmin_α ||w_i − Σ_{j≠i} α_j w_j||² + ρ||α||², from M = WWᵀ + ρI:
    α_ij = −(M⁻¹)_ij / (M⁻¹)_ii, α_ii = 0, with ρ = rho_scale · trace(WWᵀ) / n (so n > d stays well posed).
    M is symmetric positive definite; it is inverted by block elimination (see spd_inverse). A group whose filters
    are all zero has no dependencies: α = 0.
    """
    w = _as_filter_matrix(filters)
    n = w.shape[0]
    if rho_scale <= 0 or not np.isfinite(rho_scale):
        raise CompressorError(f"ridge scale must be a positive finite number, got {rho_scale}")
    gram = w @ w.T
    trace = float(np.trace(gram))
    if n < 2 or trace == 0.0:
        return np.zeros((n, n))
    gram[np.diag_indices(n)] += rho_scale * trace / n
    m_inv = spd_inverse(gram)
    alpha = -m_inv / np.diag(m_inv)[:, None]
    np.fill_diagonal(alpha, 0.0)
    return alpha


def pairwise_edges(filters: np.ndarray) -> np.ndarray:
    """Pairwise projection coefficients α [n, n]: α_ij = ⟨w_i, w_j⟩ / ||w_j||², α_ii = 0 (0 where w_j = 0)."""
    w = _as_filter_matrix(filters)
    gram = w @ w.T
    sq_norms = np.diag(gram).copy()
    safe = np.where(sq_norms > 0, sq_norms, 1.0)
    alpha = np.where(sq_norms[None, :] > 0, gram / safe[None, :], 0.0)
    np.fill_diagonal(alpha, 0.0)
    return alpha


def edge_weights(alpha: np.ndarray) -> np.ndarray:
    """Adjacency A = |α| with a zero diagonal: edge i → j weighs how much filter j explains filter i."""
    adjacency = np.abs(np.asarray(alpha, dtype=np.float64))
    np.fill_diagonal(adjacency, 0.0)
    return adjacency


def transition_matrix(adjacency: np.ndarray) -> np.ndarray:
    """Row-stochastic P = D⁻¹A; a row of A that sums to zero (a node with no out-edges) becomes uniform."""
    a = np.asarray(adjacency, dtype=np.float64)
    n = a.shape[0]
    out_weight = a.sum(axis=1)
    dangling = out_weight <= 0
    p = a / np.where(dangling, 1.0, out_weight)[:, None]
    p[dangling] = 1.0 / n
    return p


def stationary_distribution(
    adjacency: np.ndarray,
    damping: float = 0.85,
    tol: float = 1e-10,
    method: str = "auto",
    max_iter: int | None = None,
) -> np.ndarray:
    """Stationary distribution π (πᵀ = πᵀG, Σπ = 1) of G = dP + (1−d)/n · 11ᵀ, P = transition_matrix(A).

    Since Σπ = 1, πᵀG = πᵀ is the linear system (I − dPᵀ)π = (1−d)/n · 1, non-singular for 0 ≤ d < 1.
    method='dense' solves it directly (exact to rounding, O(n³)); method='power' iterates π ← dPᵀπ + (1−d)/n
    from the uniform vector until ||Δπ||₁ < tol (a contraction by d per step, so it always converges);
    'auto' uses 'dense' up to n = DENSE_SOLVE_MAX_N and 'power' above (~150 matrix-vector products at the
    default damping beat one O(n³) LU there).
    """
    p = transition_matrix(adjacency)
    n = p.shape[0]
    if not 0.0 <= damping < 1.0:
        raise CompressorError(f"random-walk damping must be in [0, 1), got {damping}")
    if not tol > 0:
        raise CompressorError(f"random-walk tolerance must be positive, got {tol}")
    if method not in ("auto", "dense", "power"):
        raise CompressorError(f"unknown stationary-distribution method '{method}' (auto, dense or power)")
    if n == 0:
        return np.zeros(0)
    teleport = (1.0 - damping) / n
    if method == "dense" or (method == "auto" and n <= DENSE_SOLVE_MAX_N):
        pi = np.linalg.solve(np.eye(n) - damping * p.T, np.full(n, teleport))
    else:
        pi = _power_iteration(p, damping, tol, max_iter)
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def _power_iteration(p: np.ndarray, damping: float, tol: float, max_iter: int | None) -> np.ndarray:
    n = p.shape[0]
    teleport = (1.0 - damping) / n
    if max_iter is None:
        # ||Δπ_k||₁ ≤ 2·d^k: this many steps always reach tol.
        max_iter = 2 + int(np.ceil(np.log(tol / 2.0) / np.log(damping))) if damping > 0 else 2
    p_t = np.ascontiguousarray(p.T)
    pi = np.full(n, 1.0 / n)
    for _ in range(max_iter):
        nxt = damping * (p_t @ pi) + teleport
        delta = float(np.abs(nxt - pi).sum())
        pi = nxt
        if delta < tol:
            return pi
    raise CompressorError(f"random walk did not converge to {tol} in {max_iter} steps")


def layer_importance(adjacency: np.ndarray, mode: str = "sum") -> float:
    """Random-matrix layer importance score (LIS) of one group's edge matrix A [n, n].

    S = (A + Aᵀ)/2; μ = mean of S's off-diagonal; S̃ = S − μ(11ᵀ − I); σ = std of S̃'s off-diagonal;
    bulk edge e = 2σ√n (semicircle of a Wigner matrix with that entry spread). Spikes are the eigenvalues of S̃
    above e(1 + n^(−2/3)). mode 'sum': LIS = Σ_spikes (λ/e − 1); mode 'max': LIS = λ_max / e.

    Degenerate cases score 0 (no structure beyond the mean is measurable): n < 3 (n = 2 has a single distinct
    off-diagonal value, so σ = 0; n ≤ 1 has none), and σ = 0 up to rounding (all off-diagonal entries equal, so
    S̃ = 0 and every eigenvalue is 0).
    """
    if mode not in ("sum", "max"):
        raise CompressorError(f"unknown LIS mode '{mode}' (sum or max)")
    a = np.asarray(adjacency, dtype=np.float64)
    n = a.shape[0]
    if n < 3:
        return 0.0
    s = 0.5 * (a + a.T)
    pairs = n * (n - 1)
    diagonal = np.diag(s).copy()
    mu = (float(s.sum()) - float(diagonal.sum())) / pairs
    s_tilde = s
    s_tilde -= mu
    np.fill_diagonal(s_tilde, diagonal)
    # S̃'s off-diagonal has mean 0 by construction, so its variance is its mean square.
    sigma = np.sqrt(max(float(np.einsum("ij,ij->", s_tilde, s_tilde)) - float(diagonal @ diagonal), 0.0) / pairs)
    if sigma <= 1e-12 * float(np.abs(a).max()):
        return 0.0
    edge = 2.0 * sigma * np.sqrt(n)
    eigenvalues = np.linalg.eigvalsh(s_tilde)
    if mode == "max":
        return float(eigenvalues[-1] / edge)
    spikes = eigenvalues[eigenvalues > edge * (1.0 + n ** (-2.0 / 3.0))]
    return float(np.sum(spikes / edge - 1.0))


def layer_weights_from_lis(lis: dict[int, float]) -> dict[int, float]:
    """Per-layer weights w_g = 1 − LIS_g / max LIS (all 1 when no layer has a positive LIS)."""
    top = max(lis.values(), default=0.0)
    if top <= 0:
        return {g: 1.0 for g in lis}
    return {g: 1.0 - value / top for g, value in lis.items()}


def filter_scores(
    filters: np.ndarray,
    edges: str = "regression",
    damping: float = 0.85,
    rho_scale: float = 1e-3,
    tol: float = 1e-10,
    lis_mode: str = "sum",
    normalize: bool = False,
) -> tuple[np.ndarray, float]:
    """One group's filter importance π [n] (sums to 1; low = prune first) and its LIS; `normalize` scales every
    filter to unit norm first (the scale-invariant variant: zero filters stay zero)."""
    if normalize:
        filters = unit_rows(filters)
    if edges == "regression":
        alpha = ridge_regression_edges(filters, rho_scale)
    elif edges == "pairwise":
        alpha = pairwise_edges(filters)
    else:
        raise CompressorError(f"unknown edge kind '{edges}' (regression or pairwise)")
    adjacency = edge_weights(alpha)
    return stationary_distribution(adjacency, damping, tol), layer_importance(adjacency, lis_mode)


def unit_rows(filters: np.ndarray) -> np.ndarray:
    """Each filter (row) divided by its L2 norm; all-zero rows stay zero."""
    w = _as_filter_matrix(filters)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    return np.divide(w, norms, out=np.zeros_like(w), where=norms > 0)


def _as_filter_matrix(filters: np.ndarray) -> np.ndarray:
    w = np.asarray(filters, dtype=np.float64)
    if w.ndim != 2:
        raise CompressorError(f"filter matrix must be 2-D [filters, weights], got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise CompressorError("filter weights contain NaN or infinity")
    return w


def spd_inverse(m: np.ndarray, leaf: int = INVERSE_LEAF_N) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix by recursive block elimination (block Cholesky/LDLᵀ).

    With M = [[A, B], [Bᵀ, C]] and the Schur complement S = C − BᵀA⁻¹B (SPD, no worse conditioned than M):
    M⁻¹ = [[A⁻¹ + A⁻¹BS⁻¹BᵀA⁻¹, −A⁻¹BS⁻¹], [−S⁻¹BᵀA⁻¹, S⁻¹]]. No pivoting is needed for SPD matrices, and all
    the work is in matrix products, about 3× faster than LAPACK's LU-based inverse at n = 2048 with the same
    forward error (κ·ε). Blocks up to `leaf` use np.linalg.inv. The result is exactly symmetric.
    """
    n = m.shape[0]
    if n <= leaf:
        inverse = np.linalg.inv(m)
        return 0.5 * (inverse + inverse.T)
    k = n // 2
    a_inv = spd_inverse(m[:k, :k], leaf)
    b = m[:k, k:]
    a_inv_b = a_inv @ b
    s_inv = spd_inverse(m[k:, k:] - b.T @ a_inv_b, leaf)
    top_right = -a_inv_b @ s_inv
    inverse = np.empty_like(m)
    top_left = a_inv - top_right @ a_inv_b.T
    inverse[:k, :k] = 0.5 * (top_left + top_left.T)
    inverse[:k, k:] = top_right
    inverse[k:, :k] = top_right.T
    inverse[k:, k:] = s_inv
    return inverse


# --- the registered method ---------------------------------------------------------------------------------------

EDGE_KINDS = ("regression", "pairwise")
LIS_MODES = ("sum", "max")
LAYER_RATE_MODES = ("rmt", "uniform", "global")


@dataclass(frozen=True)
class GraphRwOptions:
    """graph-rw's own options (PlanOptions.extra keys in brackets)."""

    edges: str = "regression"  # [rw_edges] regression | pairwise
    damping: float = 0.85  # [rw_damping] d in [0, 1)
    rho: float = 1e-3  # [rw_rho] ridge scale, > 0
    lis: str = "sum"  # [lis] sum | max
    layer_rates: str = "rmt"  # [layer_rates] rmt | uniform | global
    r_min: float = 0.0  # [rw_r_min]
    r_max: float = MAX_RATE  # [rw_r_max]
    tol: float = 1e-10  # [rw_tol] power-iteration tolerance on ||Δπ||₁
    normalize: bool = False  # [rw_normalize] unit-norm filters before the regression (scale-invariant)
    features: str = "weights"  # [rw_features] weights | calib (the graph over calibration feature maps)


_OPTION_FIELDS = {
    "rw_edges": "edges",
    "rw_damping": "damping",
    "rw_rho": "rho",
    "lis": "lis",
    "layer_rates": "layer_rates",
    "rw_r_min": "r_min",
    "rw_r_max": "r_max",
    "rw_tol": "tol",
    "rw_normalize": "normalize",
    "rw_features": "features",
}
FEATURE_SOURCES = ("weights", "calib")
_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_graph_rw_options(extra: dict | None) -> GraphRwOptions:
    """graph-rw options from PlanOptions.extra (strings or values; '-' and '_' interchangeable in keys).

    Keys of other methods are ignored; an unknown key starting with 'rw_' or a bad value raises CompressorError.
    """
    values: dict[str, object] = {}
    for raw_key, raw in (extra or {}).items():
        key = str(raw_key).strip().replace("-", "_")
        if key in _OPTION_FIELDS:
            values[key] = raw
        elif key.startswith("rw_"):
            raise CompressorError(f"unknown graph-rw option '{raw_key}' (known: {', '.join(_OPTION_FIELDS)})")
    choices = {"edges": EDGE_KINDS, "lis": LIS_MODES, "layer_rates": LAYER_RATE_MODES, "features": FEATURE_SOURCES}
    parsed: dict[str, object] = {}
    for key, value in values.items():
        name = _OPTION_FIELDS[key]
        if name in choices:
            text = str(value).strip().lower()
            if text not in choices[name]:
                raise CompressorError(f"{key} must be one of {', '.join(choices[name])}, got '{value}'")
            parsed[name] = text
        elif name == "normalize":
            text = str(value).strip().lower()
            if text not in _BOOLEANS:
                raise CompressorError(f"{key} must be true or false, got '{value}'")
            parsed[name] = _BOOLEANS[text]
        else:
            parsed[name] = _as_float(key, value)
    opts = GraphRwOptions(**parsed)
    if not 0.0 <= opts.damping < 1.0:
        raise CompressorError(f"rw_damping must be in [0, 1), got {opts.damping}")
    if not opts.rho > 0:
        raise CompressorError(f"rw_rho must be positive, got {opts.rho}")
    if not opts.tol > 0:
        raise CompressorError(f"rw_tol must be positive, got {opts.tol}")
    if not 0.0 <= opts.r_min <= opts.r_max <= 1.0 or opts.r_max == 0.0:
        raise CompressorError(f"need 0 <= rw_r_min <= rw_r_max <= 1 and rw_r_max > 0, got {opts.r_min} and {opts.r_max}")
    return opts


def _as_float(key: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise CompressorError(f"{key} must be a number, got '{value}'") from None
    if not np.isfinite(number):
        raise CompressorError(f"{key} must be finite, got '{value}'")
    return number


def score_groups(analysis: Analysis, groups: list[int], opts: GraphRwOptions, calibration=None,
                 notes: list[str] | None = None) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """π (per unit) and LIS of each listed group, from analysis.group_filters, or with rw_features=calib from the
    channels' feature maps over `calibration` (a CalibrationSet); `notes` gets what the plan should say about it."""
    maps: dict = {}
    if opts.features == "calib":
        if calibration is None:
            raise CompressorError("graph-rw rw_features=calib needs calibration data (--calib DATA on compress, "
                                  "--calib-count N on compress train)")
        from compressor.calibration.features import group_feature_maps

        maps = group_feature_maps(analysis, groups, calibration)
        fallback = [g for g in groups if maps.get(g) is None]
        if notes is not None:
            notes.append(f"graph-rw: graphs over calibration feature maps ({calibration.count} samples) for "
                         f"{len(groups) - len(fallback)} groups"
                         + (f", weights for {len(fallback)} with channels no supported layer reads" if fallback else ""))
    scores, lis = {}, {}
    for g in groups:
        # feature maps are always scaled to unit norm (their scales are arbitrary after BN folding)
        nodes, normalize = (maps[g], True) if maps.get(g) is not None else (analysis.group_filters(g), opts.normalize)
        scores[g], lis[g] = filter_scores(nodes, opts.edges, opts.damping, opts.rho, opts.tol, opts.lis, normalize)
    return scores, lis


def scores_graph_rw(analysis: Analysis, options: PlanOptions) -> dict[int, np.ndarray]:
    """Random-walk filter scores π of every prunable group (the importance graph-rw prunes by)."""
    scores, _ = score_groups(analysis, prunable_groups(analysis, options), parse_graph_rw_options(options.extra),
                             options.calibration)
    return scores


@register("graph-rw", options=tuple(_OPTION_FIELDS), scores=scores_graph_rw,
          scores_note="graph-rw: random-walk filter scores from score_groups; its layer rates are replaced by the "
                      "latency allocation")
def plan_graph_rw(analysis: Analysis, options: PlanOptions) -> Plan:
    """Random-walk filter scores; per-layer rates from the random-matrix LIS (or uniform, or a global ranking).

    plan.group_info[g] = {"lis", "rate" (removed fraction of the group), "pruned" (local unit indices)}.
    """
    opts = parse_graph_rw_options(options.extra)
    groups = prunable_groups(analysis, options)
    notes: list[str] = []
    scores, lis = score_groups(analysis, groups, opts, options.calibration, notes)
    if opts.layer_rates == "global":
        # π sums to 1 in every group, so π·n has mean 1 everywhere: comparable across groups.
        comparable = {g: scores[g] * analysis.groups[g].size for g in groups}
        plan = allocate_global(analysis, comparable, options, r_max=opts.r_max)
    else:
        weights = layer_weights_from_lis(lis) if opts.layer_rates == "rmt" else None
        plan = allocate(analysis, scores, options, layer_weights=weights, r_min=opts.r_min, r_max=opts.r_max)
    for g in groups:
        pruned = np.sort(np.asarray(plan.removed.get(g, []), dtype=np.int64))
        plan.group_info.setdefault(g, {}).update(
            {"lis": float(lis[g]), "rate": len(pruned) / analysis.groups[g].size, "pruned": pruned.tolist()}
        )
    plan.notes += notes
    return plan
