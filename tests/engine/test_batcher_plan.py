"""plan_batch: the packing rule, on plain numbers."""

from tkr_embed.engine.batcher import plan_batch, plan_packed_batch, resolve_batch_tokens


def padded(costs, chosen):
    return max(costs[i] for i in chosen) * len(chosen)


def test_oldest_is_always_included_and_budget_respected():
    costs = [50, 10, 12, 11, 200, 13, 49]
    seqs = list(range(len(costs)))
    chosen = plan_batch(costs, seqs, max_tokens=120, max_items=64)
    assert 0 in chosen  # the oldest (seq 0) is served first
    assert padded(costs, chosen) <= 120


def test_prefers_similar_lengths():
    costs = [10, 11, 300, 12, 9, 290]
    chosen = plan_batch(costs, list(range(6)), max_tokens=10_000, max_items=4)
    assert sorted(costs[i] for i in chosen) == [9, 10, 11, 12]


def test_item_cap():
    chosen = plan_batch([5] * 100, list(range(100)), max_tokens=10**9, max_items=8)
    assert len(chosen) == 8 and 0 in chosen


def test_an_item_over_the_budget_still_runs_alone():
    chosen = plan_batch([5000, 10], [0, 1], max_tokens=100, max_items=8)
    assert chosen == [0]


def test_everything_fits_when_budget_allows():
    costs = [7, 3, 9, 1]
    assert sorted(plan_batch(costs, [3, 1, 0, 2], 1000, 10)) == [0, 1, 2, 3]


def test_queries_and_passages_run_as_separate_batches_under_a_padding_floor():
    costs = [26, 252, 24, 250, 30, 252, 28, 251]
    seqs = list(range(len(costs)))
    first = plan_batch(costs, seqs, max_tokens=10**6, max_items=64, min_efficiency=0.5)
    assert sorted(costs[i] for i in first) == [24, 26, 28, 30]  # the oldest (26) and its kind
    rest = [i for i in range(len(costs)) if i not in first]
    second = plan_batch([costs[i] for i in rest], [seqs[i] for i in rest], 10**6, 64, 0.5)
    assert sorted(costs[rest[i]] for i in second) == [250, 251, 252, 252]
    # Without the floor the same queue goes in one batch, every query padded to 252 tokens.
    assert len(plan_batch(costs, seqs, 10**6, 64)) == len(costs)


def test_padding_floor_still_runs_a_lone_outlier():
    chosen = plan_batch([26, 26, 252], [2, 1, 0], max_tokens=10**6, max_items=64, min_efficiency=0.9)
    assert chosen == [2]  # the oldest item is the long one: it runs, alone


def test_batch_token_budget_by_backend_unless_set():
    assert resolve_batch_tokens(0, on_cpu=True) == 4096  # CPU caches: smaller batches run faster
    assert resolve_batch_tokens(0, on_cpu=False) == 8192  # GPUs (measured against 16384)
    assert resolve_batch_tokens(3000, on_cpu=False) == 3000


def test_budget_counts_the_bucketed_shape_the_device_runs():
    """With shape buckets (CUDA) 29 images of 278 tokens fit an 8192 budget as 29 x 278 but run as
    32 rows x 320 tokens: 10,240, three rows of repeated work. Counting the bucketed shape ends
    the batch at 24 (24 x 320 = 7,680); 180-word texts (224 tokens) at 32 rather than 36 (-> 40 rows)."""
    import functools

    from tkr_embed.engine.shapes import ShapeBuckets

    device_tokens = functools.partial(ShapeBuckets(max_items=64).padded_tokens, max_tokens=32768)

    for cost, plain, bucketed in ((278, 29, 24), (224, 36, 32)):
        costs, seqs = [cost] * 64, list(range(64))
        assert len(plan_batch(costs, seqs, 8192, 64)) == plain
        chosen = plan_batch(costs, seqs, 8192, 64, padded=device_tokens)
        assert len(chosen) == bucketed and device_tokens(len(chosen), cost) <= 8192
        assert device_tokens(len(chosen) + 1, cost) > 8192  # and no smaller than it has to be
    # short texts are bounded by max_items either way; one item over the budget still runs alone
    assert len(plan_batch([48] * 100, list(range(100)), 8192, 64, padded=device_tokens)) == 64
    assert plan_batch([9000, 10], [0, 1], 8192, 64, padded=device_tokens) == [0]


def test_packed_batches_take_the_oldest_that_fit_in_real_tokens():
    costs = [26, 252, 24, 250, 30, 252, 28, 251]
    seqs = [7, 0, 6, 1, 5, 2, 4, 3]  # item 1 is the oldest, then 3, 5, 7, 6, 4, 2, 0
    # Lengths mix freely (nothing pads): the budget counts 252 + 250 + 252 + 251 + 28 = 1033.
    chosen = plan_packed_batch(costs, seqs, max_tokens=1040, max_items=64)
    assert chosen == [1, 3, 5, 7, 6]
    # An item that does not fit is passed over for a later one that does.
    assert plan_packed_batch([100, 900, 50], [0, 1, 2], max_tokens=200, max_items=64) == [0, 2]
    assert plan_packed_batch([5] * 10, list(range(10)), max_tokens=10**6, max_items=4) == [0, 1, 2, 3]
    assert plan_packed_batch([5000, 10], [0, 1], max_tokens=100, max_items=8) == [0]  # alone, over budget
