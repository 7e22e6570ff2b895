"""Group-stratified batches (SPEC §3) and fixed-order evaluation batches."""
import math

import pytest
import torch

from tdro.config import Config
from tdro.data import EvalBatches, GroupStratifiedBatches, build_dataset, group_quotas, train_batches


@pytest.fixture(scope="module")
def digits():
    return build_dataset(Config())


@pytest.mark.parametrize("sizes,batch,mode", [
    ([600, 150], 32, "proportional"), ([1000, 10, 3], 16, "proportional"), ([5, 5, 5, 5], 4, "proportional"),
    ([600, 150], 33, "balanced"), ([1, 1000], 7, "balanced"), ([100, 1, 1, 1, 1], 5, "proportional"),
])
def test_quotas_sum_to_batch_and_hold_every_group(sizes, batch, mode):
    quotas = group_quotas(sizes, batch, mode)
    assert sum(quotas) == batch and min(quotas) >= 1


def test_quota_rules():
    assert group_quotas([600, 150], 32, "proportional") == [26, 6]
    assert group_quotas([1000, 10, 3], 16, "proportional") == [14, 1, 1]
    assert group_quotas([600, 150], 33, "balanced") == [17, 16]
    with pytest.raises(ValueError, match="batch_size 2 is smaller than the number of groups"):
        group_quotas([5, 5, 5], 2)
    with pytest.raises(ValueError, match="unknown batching mode"):
        group_quotas([5, 5], 4, "stratified")


def test_every_batch_holds_each_quota_with_fixed_shapes(digits):
    batches = GroupStratifiedBatches(digits, "train", 32, "proportional", torch.Generator().manual_seed(0))
    sizes = digits.sizes("train")
    assert batches.largest == "image"
    assert len(batches) == math.ceil(sizes["image"] / batches.quotas["image"])
    seen = {g: [] for g in digits.groups}
    count = 0
    for batch in batches:
        count += 1
        assert list(batch) == digits.group_names
        for name, (x, y) in batch.items():
            assert len(x) == len(y) == batches.quotas[name]
            assert x.shape[1:] == digits.groups[name].train.x.shape[1:]
            seen[name].append(y)
    assert count == len(batches)


def test_epoch_covers_every_sample_and_the_largest_group_once(digits):
    gen = torch.Generator().manual_seed(1)
    group = digits.groups["image"]
    marked = digits.to("cpu")
    marked.groups["image"].train.y = torch.arange(len(group.train))  # label = position, to track samples
    marked.groups["coarse"].train.y = torch.arange(len(digits.groups["coarse"].train))
    batches = GroupStratifiedBatches(marked, "train", 32, "proportional", gen)

    def epoch():
        visits = {n: torch.zeros(len(g.train), dtype=torch.long) for n, g in marked.groups.items()}
        for batch in batches:
            for name, (_, y) in batch.items():
                visits[name] += torch.bincount(y, minlength=len(visits[name]))
        return visits

    first, second = epoch(), epoch()
    image_quota = batches.quotas["image"]
    for visits in (first, second):  # the largest group: every sample once, the top-up repeats a few
        assert visits["image"].min() >= 1
        assert int(visits["image"].sum()) == len(batches) * image_quota
        assert int((visits["image"] > 1).sum()) < image_quota
    # the smaller group cycles through a stream that carries across epochs: uses stay even
    coarse = first["coarse"] + second["coarse"]
    assert int(coarse.sum()) == 2 * len(batches) * batches.quotas["coarse"]
    assert coarse.min() >= 1 and coarse.max() - coarse.min() <= 1


def test_balanced_mode_and_config_keys(digits):
    gen = torch.Generator().manual_seed(0)
    batches = train_batches(digits, Config(batch_size=20, batching="balanced"), gen)
    assert batches.quotas == {"image": 10, "coarse": 10}
    assert len(batches) == math.ceil(600 / 10)  # balanced: the small group cycles 4 times per epoch
    proportional = train_batches(digits, Config(batch_size=20), gen)
    assert proportional.quotas != batches.quotas


def test_order_comes_from_the_generator_alone(digits):
    def first_labels(seed):
        batches = GroupStratifiedBatches(digits, "train", 16, generator=torch.Generator().manual_seed(seed))
        return [y.tolist() for batch in batches for _, y in batch.values()]

    torch.manual_seed(123)
    a = first_labels(7)
    torch.manual_seed(456)
    assert first_labels(7) == a
    assert first_labels(8) != a


def test_eval_batches_fixed_order_exactly_once(digits):
    batches = EvalBatches(digits, "test", batch_size=50)
    got = {n: [] for n in digits.groups}
    for batch in batches:
        assert len(batch) == 1
        (name, (x, y)), = batch.items()
        assert len(y) <= 50
        got[name].append(y)
    assert sum(1 for _ in batches) == len(batches)
    for name, group in digits.groups.items():
        assert torch.equal(torch.cat(got[name]), group.test.y)


def test_batches_on_the_data_device(digits):
    moved = digits.to("cpu")
    batch = next(iter(GroupStratifiedBatches(moved, "val", 8, generator=torch.Generator().manual_seed(0))))
    assert all(x.device.type == "cpu" for x, _ in batch.values())


def test_saved_stream_state_and_generator_continue_the_epochs_exactly(digits):
    def epoch_labels(batches):
        return [torch.cat([y for _, y in batch.values()]) for batch in batches]

    straight = GroupStratifiedBatches(digits, "train", 32, generator=torch.Generator().manual_seed(3))
    expected = [epoch_labels(straight) for _ in range(3)]
    first = GroupStratifiedBatches(digits, "train", 32, generator=torch.Generator().manual_seed(3))
    for _ in range(2):
        epoch_labels(first)
    generator_state, stream_state = first.generator.get_state(), first.state_dict()
    resumed = GroupStratifiedBatches(digits, "train", 32, generator=torch.Generator())
    resumed.generator.set_state(generator_state)
    resumed.load_state_dict(stream_state)
    assert all(torch.equal(a, b) for a, b in zip(epoch_labels(resumed), expected[2]))
    with pytest.raises(ValueError, match="batch state holds groups"):
        resumed.load_state_dict({"nope": torch.zeros(0, dtype=torch.long)})
