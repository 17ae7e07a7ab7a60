"""Ranking metrics on hand-computed examples (`tastemaker.evaluation.metrics`)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tastemaker.evaluation.metrics import (
    catalog_coverage,
    hit_rate_at_k,
    intra_list_diversity,
    mrr_at_k,
    ndcg_at_k,
    novelty,
    paired_bootstrap,
    per_user_accuracy,
    popularity_share,
    recall_at_k,
    summarise,
)


def test_hit_rate_counts_a_relevant_item_only_within_the_cutoff():
    assert hit_rate_at_k([5, 3, 9], {9}, 3) == 1.0
    assert hit_rate_at_k([5, 3, 9], {9}, 2) == 0.0
    assert hit_rate_at_k([], {9}, 10) == 0.0


def test_ndcg_single_target_is_one_over_log2_of_rank_plus_one():
    assert ndcg_at_k([9, 3, 5], {9}, 10) == 1.0
    assert ndcg_at_k([5, 3, 9], {9}, 3) == pytest.approx(1 / math.log2(4))  # rank 3 -> 0.5
    assert ndcg_at_k([5, 3, 9], {9}, 2) == 0.0


def test_ndcg_with_two_relevant_items_divides_by_the_ideal_order():
    # hits at ranks 2 and 3: DCG = 1/log2(3) + 1/log2(4); ideal = 1/log2(2) + 1/log2(3)
    dcg = 1 / math.log2(3) + 0.5
    ideal = 1.0 + 1 / math.log2(3)
    assert ndcg_at_k([5, 3, 9], {3, 9}, 3) == pytest.approx(dcg / ideal)
    assert ndcg_at_k([5, 3, 9], {3, 9}, 3) == pytest.approx(0.69342, abs=1e-5)


def test_recall_is_the_share_of_relevant_items_found():
    assert recall_at_k([1, 2, 3, 4], {2, 7}, 4) == 0.5
    assert recall_at_k([1, 2, 3, 4], {2, 7}, 1) == 0.0
    assert recall_at_k([1, 2], set(), 2) == 0.0


def test_mrr_is_one_over_the_rank_of_the_first_relevant_item():
    assert mrr_at_k([4, 8, 2], {2, 8}, 3) == 0.5
    assert mrr_at_k([4, 8, 2], {2, 8}, 1) == 0.0
    assert mrr_at_k([2], {2}, 10) == 1.0


def test_catalog_coverage_counts_distinct_items_in_the_top_k_and_ignores_padding():
    assert catalog_coverage([[0, 1, 2], [1, 2, 3]], 10, 2) == pytest.approx(0.3)  # {0, 1, 2}
    assert catalog_coverage([[0, 1, 2], [1, 2, 3]], 10, 3) == pytest.approx(0.4)
    assert catalog_coverage([[-1, -1], [4, -1]], 8, 2) == pytest.approx(1 / 8)


def test_intra_list_diversity_is_one_minus_mean_pairwise_cosine():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]])
    # cosines: (0,1) = 0, (0,2) = (1,2) = 0.7071; mean = 0.4714
    assert intra_list_diversity([0, 1, 2], vectors, 10) == pytest.approx(1 - (2 * 0.70710678) / 3)
    assert intra_list_diversity([0, 0], vectors, 10) == pytest.approx(0.0)
    assert intra_list_diversity([0, 1], vectors, 10) == pytest.approx(1.0)
    assert math.isnan(intra_list_diversity([2], vectors, 10))


def test_novelty_is_mean_self_information_of_smoothed_popularity_share():
    share = popularity_share(np.array([9, 1, 0]), n_users=9)  # (c + 1) / 10
    assert share == pytest.approx([1.0, 0.2, 0.1])
    assert novelty([0], share, 10) == pytest.approx(0.0)
    assert novelty([1, 2], share, 10) == pytest.approx((math.log2(5) + math.log2(10)) / 2)
    assert math.isnan(novelty([-1], share, 10))


def test_per_user_accuracy_for_single_targets():
    ranked = np.full((3, 20), -1)
    ranked[0, :3] = [7, 8, 9]  # target 9 at rank 3
    ranked[1, :15] = np.arange(100, 115)  # target 114 at rank 15
    ranked[2, :2] = [1, 2]  # target 3 absent
    acc = per_user_accuracy(ranked, np.array([9, 114, 3]))
    assert acc["hr@10"].tolist() == [1.0, 0.0, 0.0]
    assert acc["ndcg@10"] == pytest.approx([0.5, 0.0, 0.0])
    assert acc["mrr@10"] == pytest.approx([1 / 3, 0.0, 0.0])
    assert acc["recall@20"].tolist() == [1.0, 1.0, 0.0]


def test_summarise_means_and_beyond_accuracy():
    vectors = np.eye(4)
    ranked = np.array([[0, 1, -1], [2, 1, -1]])
    share = popularity_share(np.array([3, 1, 0, 0]), 3)
    result = summarise(ranked, np.array([1, 3]), vectors, share, n_items=4)
    assert result["hr@10"] == 0.5 and result["ndcg@10"] == pytest.approx(0.5 * (1 / math.log2(3)))
    assert result["coverage@10"] == pytest.approx(0.75)
    assert result["diversity@10"] == pytest.approx(1.0)  # orthogonal vectors
    assert result["users"] == 2
    empty = summarise(ranked[:0], np.array([], dtype=int), vectors, share, n_items=4)
    assert empty["users"] == 0 and math.isnan(empty["hr@10"])


def test_paired_bootstrap_gain_and_interval():
    b = np.array([0.1, 0.2, 0.0, 0.3, 0.4])
    same = paired_bootstrap(b, b, seed=1)
    assert same["gain"] == pytest.approx(0.0) and same["ci95_low"] == pytest.approx(0.0) and same["ci95_high"] == pytest.approx(0.0)
    double = paired_bootstrap(2 * b, b, seed=1)
    assert double["gain"] == pytest.approx(1.0) and double["ci95_low"] == pytest.approx(1.0)
    noisy = paired_bootstrap(np.array([1.0, 0, 0, 0, 1]), np.array([0, 1.0, 0, 0, 0]), seed=1)
    assert noisy["ci95_low"] < noisy["gain"] < noisy["ci95_high"]
    with pytest.raises(ValueError):
        paired_bootstrap(b, b[:2])
