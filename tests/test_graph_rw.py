"""graph-rw: the closed-form math against explicit solves, and the method on real graphs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from compressor.engine import plan as engine_plan
from compressor.errors import CompressorError
from compressor.methods import graph_rw as rw

SHARED = Path(os.environ.get("COMPRESSOR_SHARED", Path(__file__).resolve().parents[2] / "shared"))
RESNET56_CHECKPOINT = SHARED / "models" / "cifar10-resnet" / "resnet56-4bfd9763.th"


# --- edges ---------------------------------------------------------------------------------------------------------


def explicit_ridge_coefficients(w: np.ndarray, rho: float) -> np.ndarray:
    """α row by row: ridge least squares of w_i on the other filters, as the augmented system [X; √ρI]α ≈ [w_i; 0]."""
    n = w.shape[0]
    alpha = np.zeros((n, n))
    for i in range(n):
        others = [j for j in range(n) if j != i]
        x = np.vstack([w[others].T, np.sqrt(rho) * np.eye(n - 1)])
        y = np.concatenate([w[i], np.zeros(n - 1)])
        alpha[i, others] = np.linalg.lstsq(x, y, rcond=None)[0]
    return alpha


@pytest.mark.parametrize("n, d", [(7, 20), (12, 5), (9, 9)])
def test_closed_form_ridge_edges_equal_per_filter_least_squares(n, d):
    rng = np.random.default_rng(n * 100 + d)
    w = rng.standard_normal((n, d)) * rng.uniform(0.1, 3.0, size=(n, 1))
    rho_scale = 1e-3
    rho = rho_scale * np.trace(w @ w.T) / n
    alpha = rw.ridge_regression_edges(w, rho_scale)
    expected = explicit_ridge_coefficients(w, rho)
    np.testing.assert_allclose(alpha, expected, rtol=1e-8, atol=1e-10 * np.abs(expected).max())
    assert np.all(np.diag(alpha) == 0.0)


def test_ridge_edges_through_the_blocked_inverse_path():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((40, 15))
    rho = 0.05 * np.trace(w @ w.T) / 40
    m = w @ w.T + rho * np.eye(40)
    inverse = rw.spd_inverse(m, leaf=8)
    assert np.array_equal(inverse, inverse.T)
    np.testing.assert_allclose(inverse @ m, np.eye(40), atol=1e-9)
    np.testing.assert_allclose(rw.ridge_regression_edges(w, 0.05), explicit_ridge_coefficients(w, rho), rtol=1e-7, atol=1e-10)


def test_ridge_edges_of_an_all_zero_group_are_zero():
    assert np.array_equal(rw.ridge_regression_edges(np.zeros((4, 3))), np.zeros((4, 4)))


def test_pairwise_edges_follow_the_projection_formula():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 10))
    w[2] = 0.0
    alpha = rw.pairwise_edges(w)
    for i in range(6):
        for j in range(6):
            expected = 0.0 if i == j or j == 2 else w[i] @ w[j] / (w[j] @ w[j])
            assert alpha[i, j] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_bad_filter_matrices_and_ridge_scales_raise():
    with pytest.raises(CompressorError):
        rw.ridge_regression_edges(np.ones(5))
    with pytest.raises(CompressorError):
        rw.ridge_regression_edges(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(CompressorError):
        rw.ridge_regression_edges(np.eye(3), rho_scale=0.0)


# --- random walk ---------------------------------------------------------------------------------------------------


def dense_eigenvector_pi(adjacency: np.ndarray, damping: float) -> np.ndarray:
    """π from np.linalg.eig of Gᵀ built explicitly (zero rows of A uniform)."""
    n = adjacency.shape[0]
    p = np.empty_like(adjacency)
    for i in range(n):
        total = adjacency[i].sum()
        p[i] = adjacency[i] / total if total > 0 else 1.0 / n
    g = damping * p + (1.0 - damping) / n * np.ones((n, n))
    values, vectors = np.linalg.eig(g.T)
    v = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
    return v / v.sum()


@pytest.mark.parametrize("method", ["auto", "dense", "power"])
@pytest.mark.parametrize("damping", [0.85, 0.5])
def test_stationary_distribution_matches_dense_eigenvector(method, damping):
    rng = np.random.default_rng(3)
    a = rw.edge_weights(rw.ridge_regression_edges(rng.standard_normal((30, 12))))
    a[7] = 0.0  # a dangling node: its row becomes uniform
    pi = rw.stationary_distribution(a, damping, tol=1e-12, method=method)
    assert pi.sum() == pytest.approx(1.0, abs=1e-14)
    assert np.all(pi > 0)
    np.testing.assert_allclose(pi, dense_eigenvector_pi(a, damping), atol=1e-10)


def test_power_iteration_meets_its_tolerance_on_a_large_group():
    rng = np.random.default_rng(4)
    a = np.abs(rng.standard_normal((300, 300))) ** 3
    np.fill_diagonal(a, 0.0)
    power = rw.stationary_distribution(a, method="power", tol=1e-10)
    dense = rw.stationary_distribution(a, method="dense")
    assert power.sum() == pytest.approx(1.0, abs=1e-14)
    # ||π_k − π||₁ ≤ d/(1−d) · ||Δπ||₁ once the iteration stops.
    assert np.abs(power - dense).sum() < 0.85 / 0.15 * 1e-10
    np.testing.assert_array_equal(rw.stationary_distribution(a), power)


def test_isolated_filter_is_visited_least():
    rng = np.random.default_rng(2)
    w = np.zeros((6, 12))
    w[:5, :6] = rng.standard_normal((5, 6))
    w[5, 8] = 100.0  # orthogonal to every other filter, and the largest
    pi, _ = rw.filter_scores(w)
    assert int(np.argmin(pi)) == 5


def test_walk_options_are_checked():
    a = np.ones((3, 3)) - np.eye(3)
    with pytest.raises(CompressorError):
        rw.stationary_distribution(a, damping=1.0)
    with pytest.raises(CompressorError):
        rw.stationary_distribution(a, method="eig")
    np.testing.assert_allclose(rw.stationary_distribution(a, damping=0.0), np.full(3, 1 / 3))


# --- layer importance ----------------------------------------------------------------------------------------------


def planted_dependencies(rng: np.random.Generator, n: int, d: int, bases: int) -> np.ndarray:
    """`bases` random filters; every other filter an exact combination of two of them."""
    base = rng.standard_normal((bases, d))
    mix = np.zeros((n - bases, bases))
    for row in mix:
        row[rng.choice(bases, 2, replace=False)] = rng.standard_normal(2)
    return np.vstack([base, mix @ base])


@pytest.mark.parametrize("n, d, edges, margin", [(64, 144, "regression", 1.0), (64, 32, "regression", 1.0),
                                                 (64, 144, "pairwise", 1.0), (64, 32, "pairwise", 0.5)])
def test_planted_dependencies_score_higher_than_noise(n, d, edges, margin):
    for seed in range(5):
        rng = np.random.default_rng(seed)
        planted = rw.filter_scores(planted_dependencies(rng, n, d, 8), edges=edges)[1]
        noise = rw.filter_scores(rng.standard_normal((n, d)), edges=edges)[1]
        assert planted > noise + margin, (seed, planted, noise)


def test_lis_follows_the_spike_formula():
    rng = np.random.default_rng(6)
    n = 40
    a = np.abs(rng.standard_normal((n, n)))
    a[:5, :5] += 4.0  # a dense block: one clear spike
    np.fill_diagonal(a, 0.0)
    s = (a + a.T) / 2
    off = ~np.eye(n, dtype=bool)
    s_tilde = np.where(off, s - s[off].mean(), s)
    edge = 2 * s_tilde[off].std() * np.sqrt(n)
    eigenvalues = np.linalg.eigvalsh(s_tilde)
    spikes = eigenvalues[eigenvalues > edge * (1 + n ** (-2 / 3))]
    assert len(spikes) >= 1
    assert rw.layer_importance(a, "sum") == pytest.approx(np.sum(spikes / edge - 1), rel=1e-10)
    assert rw.layer_importance(a, "max") == pytest.approx(eigenvalues[-1] / edge, rel=1e-10)


def test_degenerate_layers_score_zero():
    assert rw.layer_importance(np.zeros((0, 0))) == 0.0
    assert rw.layer_importance(np.array([[0.0, 2.0], [1.0, 0.0]])) == 0.0
    constant = np.ones((5, 5)) - np.eye(5)
    assert rw.layer_importance(constant, "sum") == 0.0
    assert rw.layer_importance(constant, "max") == 0.0
    assert rw.layer_importance(np.zeros((4, 4))) == 0.0
    with pytest.raises(CompressorError):
        rw.layer_importance(constant, "mean")


def test_layer_weights_and_rates():
    weights = rw.layer_weights_from_lis({0: 0.0, 1: 2.0, 2: 4.0})
    assert weights == {0: 1.0, 1: 0.5, 2: 0.0}
    assert rw.layer_weights_from_lis({0: 0.0, 1: 0.0}) == {0: 1.0, 1: 1.0}
    assert engine_plan.layer_rates(weights, 0.8, r_min=0.1, r_max=0.6) == {0: 0.6, 1: 0.4, 2: 0.1}


def test_options_parse_and_validate():
    opts = rw.parse_graph_rw_options({"rw-edges": "Pairwise", "rw_damping": "0.9", "lis": "max", "layer_rates": "uniform",
                                      "rw_r_max": 0.5, "other_method_key": 3})
    assert (opts.edges, opts.damping, opts.lis, opts.layer_rates, opts.r_max) == ("pairwise", 0.9, "max", "uniform", 0.5)
    assert rw.parse_graph_rw_options(None) == rw.GraphRwOptions()
    for bad in ({"rw_edges": "cosine"}, {"rw_damping": "1"}, {"rw_damping": "x"}, {"rw_rho": 0}, {"rw_tol": -1},
                {"lis": "mean"}, {"layer_rates": "rank"}, {"rw_r_min": 0.5, "rw_r_max": 0.4}, {"rw_dampning": 0.8},
                {"rw_rho": "nan"}):
        with pytest.raises(CompressorError):
            rw.parse_graph_rw_options(bad)


# --- the registered method on real graphs --------------------------------------------------------------------------

torch = pytest.importorskip("torch")


def export_onnx(model, path: Path, shape: tuple[int, ...]) -> Path:
    model.eval()
    torch.onnx.export(model, torch.zeros(*shape), str(path), dynamo=False, input_names=["input"], output_names=["logits"])
    return path


@pytest.fixture(scope="module")
def resnet56_onnx(tmp_path_factory) -> Path:
    from compressor.training.models import cifar_resnet, load_cifar_resnet_checkpoint

    torch.manual_seed(0)
    model = cifar_resnet("resnet56")
    if RESNET56_CHECKPOINT.is_file():
        load_cifar_resnet_checkpoint(model, RESNET56_CHECKPOINT)
    return export_onnx(model, tmp_path_factory.mktemp("r56") / "resnet56.onnx", (1, 3, 32, 32))


@pytest.fixture(scope="module")
def resnet56_analysis(resnet56_onnx):
    from compressor.engine.analysis import analyze

    return analyze(resnet56_onnx)


def plan_with(analysis, ratio: float, **extra):
    from compressor.methods import get
    from compressor.engine.plan import PlanOptions

    return get("graph-rw").plan(analysis, PlanOptions(ratio=ratio, extra=extra))


def reached(analysis, plan) -> float:
    return 1.0 - analysis.cost(plan)[0] / analysis.macs


@pytest.mark.parametrize("layer_rates", ["rmt", "uniform", "global"])
def test_rates_hit_the_mac_target_on_resnet56(resnet56_analysis, layer_rates):
    for ratio in (0.2, 0.35, 0.5):
        plan = plan_with(resnet56_analysis, ratio, layer_rates=layer_rates)
        assert abs(reached(resnet56_analysis, plan) - ratio) <= 0.02, (layer_rates, ratio)


def test_rmt_rates_follow_the_layer_scores(resnet56_analysis):
    plan = plan_with(resnet56_analysis, 0.35)
    info = plan.group_info
    assert info, "graph-rw reports per-group data"
    top = max(info, key=lambda g: info[g]["lis"])
    assert info[top]["lis"] > 0 and info[top]["rate"] == 0.0  # w = 1 − LIS/max LIS = 0 for the top layer
    for g, entry in info.items():
        assert entry["pruned"] == sorted(np.asarray(plan.removed.get(g, []), dtype=int).tolist())
        assert entry["rate"] == len(entry["pruned"]) / resnet56_analysis.groups[g].size
    # Within a group the lowest-π units went first.
    g = next(g for g in info if info[g]["pruned"] and len(info[g]["pruned"]) < resnet56_analysis.groups[g].size)
    pi, _ = rw.filter_scores(resnet56_analysis.group_filters(g))
    kept = np.setdiff1d(np.arange(len(pi)), info[g]["pruned"])
    assert pi[info[g]["pruned"]].max() <= pi[kept].min()


def test_compressed_output_is_byte_identical_across_runs(resnet56_onnx):
    import compressor

    first = compressor.compress(resnet56_onnx, method="graph-rw", ratio=0.35)
    second = compressor.compress(resnet56_onnx, method="graph-rw", ratio=0.35)
    assert first.report["verified"]
    assert abs(first.report["macs_reduction"] - 0.35) <= 0.02
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert all("lis" in g and "rate" in g and "pruned" in g for g in first.report["groups"] if g["prunable"])


def test_bad_method_options_fail_before_planning(resnet56_onnx):
    import compressor

    with pytest.raises(CompressorError, match="rw_edges"):
        compressor.compress(resnet56_onnx, method="graph-rw", ratio=0.3, method_options={"rw_edges": "cosine"})


def test_selection_differs_from_l1_on_a_crafted_layer(tmp_path):
    """Filter 7 has the largest L1 norm but is orthogonal to all others: l1 keeps it, the random walk never visits it."""
    from compressor.engine.analysis import analyze
    from compressor.methods import get
    from compressor.engine.plan import PlanOptions

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1, bias=False))
    rng = np.random.default_rng(0)
    w1 = np.zeros((8, 27))
    w1[:7, :18] = rng.standard_normal((7, 18))
    w1[7, 20:] = 10.0
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(w1.reshape(8, 3, 3, 3)))
        net[2].weight.fill_(1.0)
    analysis = analyze(export_onnx(net, tmp_path / "crafted.onnx", (1, 3, 8, 8)))
    options = PlanOptions(ratio=0.125, extra={"layer_rates": "uniform"})
    l1 = get("l1").plan(analysis, options)
    graph = get("graph-rw").plan(analysis, options)
    (group,) = graph.removed
    assert graph.removed[group].tolist() == [7]
    assert len(l1.removed[group]) == 1 and l1.removed[group][0] != 7


def test_rates_hit_the_mac_target_on_resnet50(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from compressor.engine.analysis import analyze

    torch.manual_seed(0)
    analysis = analyze(export_onnx(torchvision.models.resnet50(weights=None), tmp_path / "r50.onnx", (1, 3, 64, 64)))
    for ratio, layer_rates in ((0.5, "rmt"), (0.3, "global")):
        plan = plan_with(analysis, ratio, layer_rates=layer_rates)
        assert abs(reached(analysis, plan) - ratio) <= 0.02, (layer_rates, ratio)


def test_scale_invariant_variant_ignores_filter_norms():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(24, 40))
    w[5] = w[2] + 0.1 * rng.normal(size=40)  # some dependency structure
    scaled = w * rng.uniform(0.05, 3.0, size=(24, 1))
    plain, _ = rw.filter_scores(w)
    plain_scaled, _ = rw.filter_scores(scaled)
    unit, unit_lis = rw.filter_scores(w, normalize=True)
    unit_scaled, unit_scaled_lis = rw.filter_scores(scaled, normalize=True)
    assert np.allclose(unit, unit_scaled, rtol=1e-9, atol=1e-12 * unit.max())
    assert unit_lis == pytest.approx(unit_scaled_lis, rel=1e-9)
    assert np.abs(plain - plain_scaled).max() > 0.1 * plain.max()  # the default follows the norms
    assert rw.parse_graph_rw_options({"rw_normalize": "true"}).normalize is True
    with pytest.raises(CompressorError):
        rw.parse_graph_rw_options({"rw_normalize": "maybe"})
