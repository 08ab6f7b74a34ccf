"""Data-aware channel importance: what removing a channel does to the outputs of the layers that consume it.

For every mixing layer that reads a prunable group's channels (dense Conv, Gemm, MatMul with a constant weight), the
calibration data gives the Gram matrix G = Σ x xᵀ of the layer's input features (a Conv's features are its input
patches: channel × kernel position). A layer computing y = W x loses ‖W_B x_B‖² when the features B of one channel
are removed. Three data scores are computed from the same Grams (`--method-option calib_importance=...`):

- `act`: Σ_consumers ‖W[:, B]‖_F · ‖x_B‖ (activation-weighted norms, structured Wanda);
- `energy`: Σ_consumers tr(W_B G_BB W_Bᵀ), the consumer's output error when the channel is removed with no refit;
- `obs` (default, chosen by the ablation in benchmarks/results/recovery_resnet56.md): the consumer's output error
  when the channel is removed and the remaining weights are refitted by least squares, the error the reconstruction
  step is left with: removing B from a layer whose weights are optimal for G costs tr(W_B [(G⁻¹)_BB]⁻¹ W_Bᵀ)
  (optimal brain surgeon, one block of features per channel). Channels are removed greedily, cheapest first, with
  W and G⁻¹ updated after each removal; a channel's score is its cost at its turn (made non-decreasing along the
  order), so ranking by score is the removal order. `refit_linear` gives the least-squares weights for any removal.

The method's own scores stay the base: the unit score is base^(1−α)·data^α, both scaled to mean 1 in the group
(`calib_blend`=α, default 1: the ablation found the data score alone best; α=0 keeps the method's ranking).
Channels read by no supported layer keep their base score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compressor.errors import CompressorError
from compressor.engine.graph import attr

DATA_SCORES = ("obs", "energy", "act")
MAX_GRAM_FEATURES = 4096  # a consumer with more input features gets `energy` instead of `obs` (cost ~ D²·steps)
MAX_POSITIONS_PER_BATCH = 512  # Conv output positions sampled per batch for a Gram (seeded)
RIDGE = 1e-3  # relative ridge added to the Gram's diagonal before inversion (times its mean diagonal)


@dataclass
class Consumer:
    """One mixing layer reading group channels: its linear form W [out, D], the unit of each of its D input
    features, and the Gram of those features over the calibration data."""

    node: str
    weight: str
    tensor: str
    linear: np.ndarray
    feature_unit: np.ndarray
    kind: str
    conv: dict | None = None
    gram: np.ndarray | None = None
    samples: int = 0


def find_consumers(analysis, groups: list[int]) -> dict[int, list[Consumer]]:
    """The supported mixing layers reading each group's units ('in' parameter slices of Conv/Gemm/MatMul)."""
    wanted = {int(u): g for g in groups for u in analysis.groups[g].units}
    by_group: dict[int, list[Consumer]] = {g: [] for g in groups}
    seen: set[tuple[str, str]] = set()
    for p in analysis.params:
        if p.role != "in" or p.tensor is None or (p.node, p.init) in seen:
            continue
        hit = {wanted[int(u)] for u in p.units if int(u) in wanted}
        if not hit:
            continue
        consumer = _consumer(analysis, p)
        if consumer is None:
            continue
        seen.add((p.node, p.init))
        for g in hit:
            by_group[g].append(consumer)
    return by_group


def _consumer(analysis, p) -> Consumer | None:
    node = analysis.view.by_name[p.node]
    weight = analysis.view.constants[p.init].astype(np.float64)
    units = np.asarray(p.units, dtype=np.int64)
    if node.op_type == "Conv":
        if attr(node, "group", 1) != 1 or attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or weight.ndim != 4:
            return None
        kh, kw = weight.shape[2:]
        conv = {"kernel": (kh, kw), "strides": tuple(attr(node, "strides", [1, 1])),
                "dilations": tuple(attr(node, "dilations", [1, 1])), "pads": tuple(attr(node, "pads", [0, 0, 0, 0]))}
        return Consumer(node.name, p.init, p.tensor, weight.reshape(weight.shape[0], -1), np.repeat(units, kh * kw),
                        "conv", conv)
    if node.op_type == "Gemm":
        linear = weight if attr(node, "transB", 0) else weight.T
        return Consumer(node.name, p.init, p.tensor, linear, units, "gemm")
    if node.op_type == "MatMul" and weight.ndim == 2:
        return Consumer(node.name, p.init, p.tensor, weight.T, units, "matmul")
    return None


def conv_patches(x: np.ndarray, conv: dict, rng: np.random.Generator, limit: int) -> np.ndarray:
    """Input patches [S, C·kh·kw] of a 2-D Conv (order: channel, kernel row, kernel column, as W.reshape(O, -1)),
    at up to `limit` seeded output positions."""
    kh, kw = conv["kernel"]
    sh, sw = conv["strides"]
    dh, dw = conv["dilations"]
    top, left, bottom, right = conv["pads"]
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    windows = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    n, c, ho, wo = windows.shape[:4]
    total = n * ho * wo
    pick = np.sort(rng.choice(total, size=limit, replace=False)) if total > limit else np.arange(total)
    ni, rest = np.divmod(pick, ho * wo)
    hi, wi = np.divmod(rest, wo)
    return windows[ni, :, hi, wi].reshape(len(pick), c * kh * kw)


def accumulate_grams(proto, consumers: list[Consumer], calib, stream, batch_size: int = 64, seed: int = 0) -> None:
    """Fill each consumer's Gram over the calibration data; `stream(proto, calib, names, consume, batch_size)`
    runs the model and hands each batch's named tensors to `consume`."""
    by_tensor: dict[str, list[Consumer]] = {}
    for c in consumers:
        c.gram = np.zeros((c.linear.shape[1],) * 2)
        c.samples = 0
        by_tensor.setdefault(c.tensor, []).append(c)
    rng = np.random.default_rng(seed)

    def consume(arrays: dict[str, np.ndarray]) -> None:
        for name, users in by_tensor.items():
            x = np.asarray(arrays[name], dtype=np.float32)
            for c in users:
                if c.kind == "conv":
                    feats = conv_patches(x, c.conv, rng, MAX_POSITIONS_PER_BATCH)
                elif c.kind == "gemm":
                    feats = x.reshape(x.shape[0], -1)
                else:
                    feats = x.reshape(-1, x.shape[-1])
                c.gram += (feats.T @ feats).astype(np.float64)
                c.samples += len(feats)

    stream(proto, calib, sorted(by_tensor), consume, batch_size)
    for c in consumers:
        c.gram /= max(c.samples, 1)


def _blocks(c: Consumer, units: np.ndarray) -> list[np.ndarray]:
    return [np.nonzero(c.feature_unit == u)[0] for u in units]


def group_data_scores(group_units: np.ndarray, prunable: np.ndarray, consumers: list[Consumer],
                      kind: str) -> np.ndarray:
    """Data scores of one group's units (higher = more important); NaN for units no supported consumer reads."""
    if kind not in DATA_SCORES:
        raise CompressorError(f"unknown calib_importance '{kind}' (choose from: {', '.join(DATA_SCORES)})")
    n = len(group_units)
    scores = np.zeros(n)
    read = np.zeros(n, dtype=bool)
    for c in consumers:
        for i, b in enumerate(_blocks(c, group_units)):
            if not len(b):
                continue
            read[i] = True
            w = c.linear[:, b]
            if kind == "act":
                scores[i] += np.linalg.norm(w) * np.sqrt(max(np.trace(c.gram[np.ix_(b, b)]) / len(b), 0.0))
            else:
                scores[i] += float(np.einsum("oi,ij,oj->", w, c.gram[np.ix_(b, b)], w))
    if kind == "obs" and consumers and all(c.linear.shape[1] <= MAX_GRAM_FEATURES for c in consumers):
        scores = _obs_greedy(group_units, prunable & read, consumers, scores, read)
    scores[~read] = np.nan
    return scores


def _ridged_inverse(gram: np.ndarray) -> np.ndarray:
    return np.linalg.inv(gram + RIDGE * max(float(np.mean(np.diag(gram))), 1e-12) * np.eye(len(gram)))


def _obs_greedy(group_units, removable, consumers, energy, read) -> np.ndarray:
    """Greedy block-OBS removal over all consumers at once (see the module docstring)."""
    states = [{"w": c.linear.copy(), "hinv": _ridged_inverse(c.gram), "blocks": _blocks(c, group_units)}
              for c in consumers]
    remaining = sorted(np.nonzero(removable)[0].tolist())
    order, costs = [], []
    while remaining:
        cost = np.zeros(len(remaining))
        for s in states:
            cost += _removal_costs(s, remaining)
        pick = remaining.pop(int(np.argmin(cost)))
        order.append(pick)
        costs.append(float(cost.min()))
        for s in states:
            b = s["blocks"][pick]
            if len(b):
                inv_bb = np.linalg.inv(s["hinv"][np.ix_(b, b)])
                row = s["hinv"][b, :]
                s["w"] -= (s["w"][:, b] @ inv_bb) @ row
                s["hinv"] -= s["hinv"][:, b] @ inv_bb @ row
                s["w"][:, b] = 0.0
    scores = np.array(energy, dtype=np.float64)
    monotone = np.maximum.accumulate(np.array(costs)) if costs else np.zeros(0)
    top = float(monotone.max()) if len(monotone) else 0.0
    kept = read.copy()
    kept[order] = False
    scores[kept] = 2.0 * top + energy[kept] + 1e-30  # never removed by the greedy: above every removed unit
    scores[order] = monotone
    return scores


def _removal_costs(state: dict, candidates: list[int]) -> np.ndarray:
    """tr(W_B [(G⁻¹)_BB]⁻¹ W_Bᵀ) of each candidate unit's feature block B, batched over blocks of one size."""
    cost = np.zeros(len(candidates))
    by_size: dict[int, list[int]] = {}
    for j, i in enumerate(candidates):
        by_size.setdefault(len(state["blocks"][i]), []).append(j)
    for size, rows in by_size.items():
        if size == 0:
            continue
        idx = np.stack([state["blocks"][candidates[j]] for j in rows])
        sub = state["hinv"][idx[:, :, None], idx[:, None, :]]
        w = state["w"][:, idx]  # [out, blocks, size]
        cost[rows] = np.einsum("obk,bkl,obl->b", w, np.linalg.inv(sub), w)
    return cost


def refit_linear(c: Consumer, removed_units: np.ndarray) -> np.ndarray:
    """Least-squares (ridge) weights of consumer `c` on its features left after removing `removed_units`, fitted to
    its original outputs over the calibration Gram; removed features get zero weight."""
    gone = np.isin(c.feature_unit, removed_units)
    out = np.zeros_like(c.linear)
    if gone.all():
        return out
    keep = np.nonzero(~gone)[0]
    gram = c.gram
    lhs = gram[np.ix_(keep, keep)]
    lhs = lhs + RIDGE * max(float(np.mean(np.diag(lhs))), 1e-12) * np.eye(len(keep))
    out[:, keep] = np.linalg.solve(lhs, (c.linear @ gram[:, keep]).T).T
    return out


def linear_to_weight(c: Consumer, linear: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A consumer's linear form [out, D] back in its initializer's layout."""
    if c.kind == "conv":
        return linear.reshape(shape)
    if c.kind == "gemm" and linear.shape == tuple(shape):
        return linear
    return linear.T.reshape(shape)


def refine(base: np.ndarray, data: np.ndarray, blend: float) -> np.ndarray:
    """base^(1−blend)·data^blend with both scaled to mean 1 (units without data keep their scaled base score)."""
    b = _mean_one(np.asarray(base, dtype=np.float64))
    d = np.asarray(data, dtype=np.float64)
    has = ~np.isnan(d)
    if not has.any() or blend <= 0:
        return b
    d_scaled = np.ones_like(b)
    d_scaled[has] = _mean_one(d[has])
    out = np.power(np.maximum(b, 1e-12), 1.0 - blend) * np.power(np.maximum(d_scaled, 1e-12), blend)
    return np.where(has, out, b)


def _mean_one(x: np.ndarray) -> np.ndarray:
    if len(x) and x.min() < 0:
        x = x - x.min()
    mean = float(x.mean()) if len(x) else 0.0
    return x / mean if mean > 0 else np.ones_like(x)
