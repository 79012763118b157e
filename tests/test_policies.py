"""router_service/policies.py: each policy against its definition, worked out sample by sample
in plain Python here; the name grammar and its errors."""

from __future__ import annotations

import math
import re

import pytest
import torch

from ddm_nodes.errors import DDMError
from router_service.policies import (
    LABELLED_TOP_K,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    MIN_WEIGHT,
    NO_EXPERT,
    POLICY_FORMS,
    STRATEGY_LABELS,
    RoutingDecision,
    RoutingError,
    get_policy,
    strategy_label,
)

K = 5


def _probs(n: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(2 * torch.randn(n, K, generator=g), dim=1)


def _as_dicts(decision: RoutingDecision) -> list[dict[int, float]]:
    """Per sample: {expert id: weight}; checks padding is (NO_EXPERT, 0) and ids are unique."""
    out = []
    for ids, ws in zip(decision.ids.tolist(), decision.weights.tolist(), strict=True):
        row = {}
        for i, w in zip(ids, ws, strict=True):
            if i == NO_EXPERT:
                assert w == 0
                continue
            assert i not in row
            row[i] = w
        out.append(row)
    return out


def _ranked(p: list[float]) -> list[int]:
    """Expert ids by decreasing probability, ties to the lower id."""
    return sorted(range(len(p)), key=lambda i: (-p[i], i))


def _assert_rows(decision: RoutingDecision, expected: list[dict[int, float]]) -> None:
    got = _as_dicts(decision)
    assert [set(r) for r in got] == [set(r) for r in expected]
    for g_row, e_row in zip(got, expected, strict=True):
        for i, w in e_row.items():
            assert g_row[i] == pytest.approx(w, rel=1e-6, abs=1e-7)
        assert sum(g_row.values()) == pytest.approx(1.0, abs=1e-6)


def _select(name: str, probs=None, distances=None, clusters=None, num_experts=K, **options):
    given = next(x for x in (probs, distances, clusters) if x is not None)
    return get_policy(name, **options).select(
        given.shape[0], num_experts, probs=probs, distances=distances, clusters=clusters
    )


# --- the policies ------------------------------------------------------------------------


@pytest.mark.parametrize("k", range(1, K + 1))
def test_top_k_keeps_the_k_most_probable_renormalised(k):
    probs = _probs()
    expected = []
    for p in probs.tolist():
        chosen = _ranked(p)[:k]
        total = sum(p[i] for i in chosen)
        expected.append({i: p[i] / total for i in chosen})
    decision = _select(f"top-{k}", probs=probs)
    assert decision.ids.shape == decision.weights.shape == (probs.shape[0], k)
    _assert_rows(decision, expected)
    # most probable first, so slot 0 is the top-1 choice
    assert decision.ids[:, 0].tolist() == probs.argmax(dim=1).tolist()


@pytest.mark.parametrize("tau", [0.05, 0.2, 0.35, 0.5, 0.9, 1.0])
def test_threshold_keeps_experts_at_or_above_tau_and_always_the_top_1(tau):
    probs = _probs(n=8, seed=1)
    expected = []
    for p in probs.tolist():
        chosen = [i for i in range(K) if p[i] >= tau] or [_ranked(p)[0]]
        total = sum(p[i] for i in chosen)
        expected.append({i: p[i] / total for i in chosen})
    _assert_rows(_select(f"threshold-{tau}", probs=probs), expected)


def test_threshold_above_every_probability_falls_back_to_top_1_with_weight_1():
    probs = torch.tensor([[0.3, 0.3, 0.4, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    decision = _select("threshold-0.5", probs=probs)
    assert decision.ids.tolist() == [[2], [0]]  # a five-way tie goes to the lowest id
    assert decision.weights.tolist() == [[1.0], [1.0]]  # p / p: exactly 1


def test_threshold_at_exactly_tau_is_kept():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0, 0.0]])
    _assert_rows(_select("threshold-0.25", probs=probs), [{0: 0.5, 1: 0.25, 2: 0.25}])


def test_full_weights_by_probability_and_skips_experts_below_min_weight():
    probs = torch.tensor(
        [
            [0.5, 0.3, 0.2 - 2e-7, 1e-7, 1e-7],  # two negligible experts
            [0.2, 0.2, 0.2, 0.2, 0.2],
            [1.0 - 2e-6, 2e-6, 0.0, 0.0, 0.0],  # just above MIN_WEIGHT: kept
        ]
    )
    expected = []
    for p in probs.tolist():
        chosen = [i for i in range(K) if p[i] >= MIN_WEIGHT]
        total = sum(p[i] for i in chosen)
        expected.append({i: p[i] / total for i in chosen})
    assert [len(r) for r in expected] == [3, 5, 2]
    decision = _select("full", probs=probs)
    _assert_rows(decision, expected)
    assert decision.ids.shape == (3, 5)  # as wide as the widest row


def test_full_on_dense_probabilities_is_the_probabilities_themselves():
    probs = _probs(seed=3)
    assert bool((probs >= MIN_WEIGHT).all())
    torch.testing.assert_close(_select("full", probs=probs).dense(K), probs)


def test_uniform_selects_every_expert_with_equal_weight():
    decision = get_policy("uniform").select(3, K)
    assert get_policy("uniform").needs is None
    assert decision.ids.tolist() == [list(range(K))] * 3
    _assert_rows(decision, [{i: 1 / K for i in range(K)}] * 3)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("temperature", [None, 0.5, 4.0])
def test_nearest_centroid_takes_the_k_closest_with_softmax_of_negative_distance(k, temperature):
    g = torch.Generator().manual_seed(k)
    distances = 1 + 5 * torch.rand(4, K, generator=g)
    temp = 1.0 if temperature is None else temperature
    expected = []
    for d in distances.tolist():
        chosen = sorted(range(K), key=lambda i: (d[i], i))[:k]
        z = sum(math.exp(-d[i] / temp) for i in chosen)
        expected.append({i: math.exp(-d[i] / temp) / z for i in chosen})
    options = {} if temperature is None else {"temperature": temperature}
    name = "nearest-centroid" if k == 1 else f"nearest-centroid-{k}"
    policy = get_policy(name, **options)
    assert policy.needs == "features" and policy.k == k
    _assert_rows(_select(name, distances=distances, **options), expected)


def test_nearest_centroid_two_clusters_weights_are_a_logistic_of_the_gap():
    distances = torch.tensor([[3.0, 1.0, 2.0, 9.0, 9.0]])
    decision = _select("nearest-centroid-2", distances=distances, temperature=0.5)
    assert decision.ids.tolist() == [[1, 2]]
    near = 1 / (1 + math.exp(-(2.0 - 1.0) / 0.5))
    assert decision.weights[0].tolist() == pytest.approx([near, 1 - near], rel=1e-6)


def test_oracle_selects_each_samples_true_cluster():
    clusters = torch.tensor([2, 0, 4, 2])
    policy = get_policy("oracle")
    assert policy.needs == "oracle"
    decision = _select("oracle", clusters=clusters)
    assert decision.ids.tolist() == [[2], [0], [4], [2]]
    assert decision.weights.tolist() == [[1.0]] * 4
    with pytest.raises(ValueError, match="0..4"):
        _select("oracle", clusters=torch.tensor([1, 5]))


def test_router_policies_need_router_probabilities():
    for name in ("full", "top-2", "threshold-0.3"):
        assert get_policy(name).needs == "router"
        with pytest.raises(ValueError, match="needs router probabilities"):
            get_policy(name).select(2, K, distances=torch.ones(2, K))
    with pytest.raises(ValueError, match=r"shape \(2, 3\), expected \(2, 5\)"):
        get_policy("top-1").select(2, K, probs=torch.ones(2, 3) / 3)


def test_decision_views_agree_with_each_other():
    decision = RoutingDecision(
        ids=torch.tensor([[3, 1], [1, NO_EXPERT], [0, 3]]),
        weights=torch.tensor([[0.75, 0.25], [1.0, 0.0], [0.5, 0.5]]),
    )
    assert decision.experts() == [0, 1, 3]
    assert decision.rows(1).tolist() == [0, 1]
    assert decision.rows(3).tolist() == [0, 2]
    assert decision.rows(2).tolist() == []
    assert decision.counts().tolist() == [2, 1, 2]
    assert decision.dense(4).tolist() == [
        [0.0, 0.25, 0.0, 0.75],
        [0.0, 1.0, 0.0, 0.0],
        [0.5, 0.0, 0.0, 0.5],
    ]


# --- the name grammar --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,canonical,k",
    [
        ("full", "full", None),
        ("uniform", "uniform", None),
        ("oracle", "oracle", None),
        ("top-1", "top-1", 1),
        ("top-12", "top-12", 12),
        (" Top-3 ", "top-3", 3),
        ("threshold-0.25", "threshold-0.25", None),
        ("threshold-1", "threshold-1", None),
        ("nearest-centroid", "nearest-centroid", 1),
        ("nearest-centroid-1", "nearest-centroid", 1),
        ("nearest-centroid-3", "nearest-centroid-3", 3),
    ],
)
def test_policy_names_parse(name, canonical, k):
    policy = get_policy(name)
    assert policy.name == canonical and policy.k == k
    assert policy.tau == (0.25 if "0.25" in name else 1.0 if "threshold" in name else None)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "best",
        "top",
        "top-0",
        "top-x",
        "top2",
        "top--1",
        "top-1.5",
        "threshold",
        "threshold-",
        "threshold-0",
        "threshold-1.5",
        "threshold--0.5",
        "threshold-abc",
        "threshold-nan",
        "threshold-inf",
        "threshold-1e999",
        "threshold-1_0",
        "threshold-٠.٥",  # Arabic-Indic digits: float() takes them, a policy name does not
        "top-٣",
        "nearest-centroid-٢",
        "top-99999999999999999999",
        "nearest-centroid-0",
        "nearest_centroid",
        "oracle-2",
    ],
)
def test_bad_names_raise_a_value_error_listing_the_valid_forms(name):
    with pytest.raises(ValueError) as info:
        get_policy(name)
    message = str(info.value)
    assert repr(name) in message
    for form in ("full", "uniform", "top-K", "threshold-T (0 < T <= 1)", "nearest-centroid-K"):
        assert form in message
    assert isinstance(info.value, DDMError)  # the CLI prints it as a one-line user error


@pytest.mark.parametrize("name", ["top-6", "nearest-centroid-6"])
def test_k_above_the_number_of_experts_raises_when_applied(name):
    policy = get_policy(name)  # K unknown at parse time
    with pytest.raises(RoutingError, match=r"only 5.*top-K \(1 <= K <= 5\)"):
        policy.select(2, K, probs=_probs(2), distances=torch.ones(2, K))
    wide = policy.select(2, 6, probs=torch.ones(2, 6) / 6, distances=torch.ones(2, 6))
    assert wide.ids.shape == (2, 6)


def test_temperature_weights_router_policies_and_nearest_centroid_only():
    assert get_policy("nearest-centroid-2", temperature=0.1).temperature == 0.1
    assert get_policy("top-2@0.5") == get_policy("top-2", temperature=0.5)
    assert get_policy("full@2").name == "full@2" and get_policy("full@1").name == "full"
    for name in ("uniform@0.5", "oracle@2"):
        with pytest.raises(ValueError, match="router policies and nearest-centroid"):
            get_policy(name)
    with pytest.raises(ValueError, match="do not also pass"):
        get_policy("full@0.5", temperature=0.5)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="positive"):
            get_policy("nearest-centroid", temperature=bad)
        with pytest.raises(ValueError, match="positive"):
            get_policy(f"top-2@{bad}")
    with pytest.raises(ValueError, match="positive number, as in"):
        get_policy("full@hot")


@pytest.mark.parametrize("suffix", ["٢", "1_0", "inf", "nan", "0x10", " 2"])
def test_a_temperature_suffix_is_a_plain_ascii_number(suffix):
    with pytest.raises(RoutingError, match="positive number, as in full@0.5"):
        get_policy(f"top-2@{suffix}")
    assert get_policy("top-2@2.5e-1").temperature == 0.25


def test_temperatures_outside_the_bounds_are_refused_where_weights_would_turn_nan():
    assert get_policy(f"full@{MIN_TEMPERATURE}").temperature == MIN_TEMPERATURE
    assert get_policy("full", temperature=MAX_TEMPERATURE).temperature == MAX_TEMPERATURE
    # at 1e-320, log(p) / T overflows to -inf for every expert and the softmax is NaN
    for bad in (MIN_TEMPERATURE / 2, 1e-320, MAX_TEMPERATURE * 2):
        bounds = re.escape(f"from {MIN_TEMPERATURE:g} to {MAX_TEMPERATURE:g}")
        with pytest.raises(RoutingError, match=bounds):
            get_policy("top-2", temperature=bad)


@pytest.mark.parametrize("temperature", [0.25, 3.0])
def test_router_temperature_routes_on_renormalised_powers_of_the_probabilities(temperature):
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.15, 0.05, 0.8]])
    powered = probs ** (1 / temperature)
    expected = powered / powered.sum(dim=1, keepdim=True)  # p^(1/T) / sum_j p_j^(1/T)
    full = get_policy(f"full@{temperature}").select(2, 3, probs=probs)
    torch.testing.assert_close(full.dense(3), expected, atol=1e-6, rtol=0)
    top = get_policy(f"top-2@{temperature}").select(2, 3, probs=probs)
    kept = expected.clone()
    kept[kept < kept.topk(2, dim=1).values[:, 1:]] = 0
    torch.testing.assert_close(
        top.dense(3), kept / kept.sum(dim=1, keepdim=True), atol=1e-6, rtol=0
    )
    # sharpening keeps the ranking: the same experts are selected at any temperature
    assert torch.equal(top.ids, get_policy("top-2").select(2, 3, probs=probs).ids)


def test_every_documented_form_parses():
    examples = {
        "top-K": "top-2",
        "threshold-T": "threshold-0.5",
        "nearest-centroid-K": "nearest-centroid-2",
        "NAME@T": "top-2@0.5",
    }
    needs = {get_policy(examples.get(form, form)).needs for form in POLICY_FORMS}
    assert needs == {"router", "features", "oracle", None}


# --- bounded metric labels ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, label",
    [
        ("threshold-0.137", "threshold"),
        ("threshold-1", "threshold"),
        ("threshold-0.5@0.25", "threshold"),
        ("nearest-centroid", "nearest-centroid"),
        ("nearest-centroid-7", "nearest-centroid"),
        ("nearest-centroid-2@0.5", "nearest-centroid"),
        ("top-1", "top-1"),
        (f"top-{LABELLED_TOP_K}", f"top-{LABELLED_TOP_K}"),
        (f"top-{LABELLED_TOP_K + 1}", "top-k"),
        ("top-123456", "top-k"),
        ("TOP-2@4", "top-2"),
        ("full", "full"),
        ("full@0.25", "full"),
        ("uniform", "uniform"),
        ("oracle", "oracle"),
        ("bogus", "invalid"),
        ("top-٣", "invalid"),
        ("threshold-nan", "invalid"),
        (None, "invalid"),
    ],
)
def test_strategy_label_maps_every_policy_name_into_a_bounded_set(name, label):
    assert strategy_label(name) == label
    assert label in STRATEGY_LABELS
    assert strategy_label(label) == label  # a label is its own label


def test_distinct_thresholds_and_temperatures_share_one_label():
    names = [f"threshold-{0.01 * i:.2f}" for i in range(1, 21)]
    names += [f"top-2@{0.1 * i:.1f}" for i in range(1, 21)]
    assert {strategy_label(get_policy(n)) for n in names} == {"threshold", "top-2"}
    assert len({get_policy(n).name for n in names}) == 40  # the names stay distinct
    assert len(STRATEGY_LABELS) == 7 + LABELLED_TOP_K
