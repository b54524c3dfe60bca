"""Multi-process scoring gives the single-process result of the same global batches (2 CPU processes, gloo)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tiny

import amp.distributed as D
from amp.criteria import ClassCrossEntropy, ContrastiveCrossEntropy, Criterion, Entropy, KLToDense
from amp.data import SyntheticImages
from amp.recovery import calibration_stats, compensate_model
from amp.scoring import magnitude_scores, taylor_scores
from amp.surgery import snapshot
from amp.width_search import amp_search, materialise

WORLD = 2
IMAGES, BATCH, SEED = 11, 4, 3  # global batches of 4, 4, 3: the last is split 2 + 1
FEATURES, DIM = 7, 12  # criterion checks: 7 rows split 4 + 3


class Spread(Criterion):
    """Not a mean over rows: exercises the whole-loss-on-every-rank fallback."""

    name = "spread"

    def __call__(self, features, context=None):
        return F.normalize(features.float(), dim=-1).mean(0).pow(2).sum()


def _text(texts):
    return torch.stack([torch.randn(DIM, generator=torch.Generator().manual_seed(int(t[1:]))) for t in texts])


def _criteria():
    classifier = torch.randn(5, DIM, generator=torch.Generator().manual_seed(1))
    return {
        "entropy": Entropy(temp_inv=5.0),
        "kl_to_dense": KLToDense(temp_inv=5.0),
        "class_ce": ClassCrossEntropy(classifier, logit_scale=10.0, project=False),
        "contrastive": ContrastiveCrossEntropy(_text, logit_scale=10.0),
        "spread": Spread(),
    }


def _global_rows():
    g = torch.Generator().manual_seed(7)
    features, dense = torch.randn(FEATURES, DIM, generator=g), torch.randn(FEATURES, DIM, generator=g)
    labels = torch.randint(0, 5, (FEATURES,), generator=g)
    return features, dense, labels, [f"c{i}" for i in range(FEATURES)]


def _targets(name, labels, captions, rows):
    if name == "class_ce":
        return labels[rows]
    if name == "contrastive":
        return [captions[i] for i in rows.tolist()]
    return None


def _search(backbone, loader, criterion, **options):
    return amp_search(
        backbone,
        magnitude_scores(backbone),
        materialise(loader),
        criterion,
        threshold=2e-3,
        steps=4,
        progress=False,
        **options,
    )


CALIB_TOKENS = 23  # eva_norm at 28 px: 5 tokens per image, so the kept sample ends inside the second global batch


def _calibration(loader):
    """Dense statistics of eva_norm (a hidden-norm site keeps token samples), then an lstsq-compensated copy."""
    backbone = tiny("eva_norm")
    stats = calibration_stats(backbone, materialise(loader, progress=False), max_tokens=CALIB_TOKENS, chunk_size=1)
    states = [snapshot(site) for site in backbone.sites()]
    scores = magnitude_scores(backbone)
    widths = [w // 2 for w in backbone.widths()]
    compensate_model(backbone, states, scores.orders(), widths, stats, method="lstsq")
    weights = {k: v.clone() for k, v in backbone.model.state_dict().items() if "mlp.fc2" in k}
    return stats, weights


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    assert D.init_from_env(timeout_s=120)  # a deadlock fails the test instead of hanging it
    try:
        assert (D.rank(), D.world_size(), dist.get_backend()) == (rank, WORLD, "gloo")
        result = {}
        backbone = tiny("open_clip")
        data = SyntheticImages(IMAGES, size=32, seed=SEED)
        loader = D.sharded(data, BATCH, seed=SEED)
        scores = taylor_scores(backbone, loader, Entropy(temp_inv=5.0), progress=False)
        result["scores"], result["meta"] = scores.values, scores.meta
        chunked = taylor_scores(tiny("open_clip"), loader, Entropy(temp_inv=5.0), progress=False, chunk_size=1)
        result["chunked"] = chunked.values  # each rank chunks its own share (2 or 1 images) of every global batch
        result["calibration"] = _calibration(D.sharded(SyntheticImages(IMAGES, size=28, seed=SEED), BATCH, seed=SEED))

        # a last global batch with fewer images than ranks leaves rank 1 a batch short: refused, no deadlock
        short = D.sharded(SyntheticImages(9, size=32), BATCH, seed=SEED)
        try:
            taylor_scores(tiny("open_clip"), short, Entropy(), progress=False)
            result["short"] = "accepted"
        except ValueError as error:
            result["short"] = str(error)

        features, dense, labels, captions = _global_rows()
        rows = torch.tensor_split(torch.arange(FEATURES), WORLD)[rank]
        for name, criterion in _criteria().items():
            wrapped = D.GlobalCriterion(criterion)
            local = features[rows].clone().requires_grad_(True)
            context = wrapped.context(_targets(name, labels, captions, rows), dense[rows])
            loss = wrapped(local, context)
            loss.backward()
            result[name] = (loss.item(), local.grad)

        result["search"] = _search(tiny("open_clip"), loader, D.GlobalCriterion(KLToDense(temp_inv=5.0)))
        kl = D.GlobalCriterion(KLToDense(temp_inv=5.0))  # chunks of this rank's share, caches on disk, compensated
        options = dict(chunk_size=1, cache_gb=1e-9, compensation="bias")
        result["search_bounded"] = _search(tiny("open_clip"), loader, kl, **options)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_two_processes_score_like_one_process_on_the_global_batch(ranks):
    single_loader = D.sharded(SyntheticImages(IMAGES, size=32, seed=SEED), BATCH, seed=SEED, rank=0, world_size=1)
    expected = taylor_scores(tiny("open_clip"), single_loader, Entropy(temp_inv=5.0), progress=False)
    for result in ranks:  # every rank ends with the same, global scores
        assert result["meta"]["images"] == IMAGES and result["meta"]["world_size"] == WORLD
        for got, want in zip(result["scores"], expected.values):
            assert want.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


def test_chunked_shares_score_like_one_process_on_the_whole_global_batch(ranks):
    single_loader = D.sharded(SyntheticImages(IMAGES, size=32, seed=SEED), BATCH, seed=SEED, rank=0, world_size=1)
    expected = taylor_scores(tiny("open_clip"), single_loader, Entropy(temp_inv=5.0), progress=False)
    for result in ranks:
        for got, want in zip(result["chunked"], expected.values):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


def test_calibration_statistics_and_compensation_are_those_of_the_union_on_every_rank(ranks):
    single = D.sharded(SyntheticImages(IMAGES, size=28, seed=SEED), BATCH, seed=SEED, rank=0, world_size=1)
    stats, weights = _calibration(single)
    (stats0, weights0), (stats1, weights1) = (result["calibration"] for result in ranks)
    for layer, want in stats.items():
        assert want.count == IMAGES * 5 and want.inputs.shape[0] == CALIB_TOKENS
        for got in (stats0[layer], stats1[layer]):
            assert got.count == want.count
            torch.testing.assert_close(got.mean, want.mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got.second, want.second, rtol=1e-10, atol=1e-12)
            assert torch.equal(got.inputs, want.inputs) and torch.equal(got.outputs, want.outputs)  # same tokens, order
    assert weights0.keys() == weights.keys() and len(weights) > 0
    for key, want in weights.items():
        assert torch.equal(weights0[key], weights1[key])  # both ranks compensate the same model
        torch.testing.assert_close(weights0[key], want, rtol=1e-5, atol=1e-6)


def test_local_rows_get_the_gradient_of_the_global_loss_once(ranks):
    features, dense, labels, captions = _global_rows()
    for name, criterion in _criteria().items():
        everyone = features.clone().requires_grad_(True)
        targets = _targets(name, labels, captions, torch.arange(FEATURES))
        loss = criterion(everyone, criterion.context(targets, dense))
        loss.backward()
        for result in ranks:  # the value is the global loss on every rank
            assert result[name][0] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7), name
        grads = torch.cat([result[name][1] for result in ranks])  # rank order = global row order
        assert everyone.grad.abs().max() > 0
        torch.testing.assert_close(grads, everyone.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_search_with_a_global_criterion_matches_one_process(ranks):
    single_loader = D.sharded(SyntheticImages(IMAGES, size=32, seed=SEED), BATCH, seed=SEED, rank=0, world_size=1)
    expected = _search(tiny("open_clip"), single_loader, KLToDense(temp_inv=5.0))
    assert 0 < sum(expected.widths) < sum(expected.dense_widths)  # the threshold exercises the bisection
    for result in ranks:
        assert result["search"].widths == expected.widths
        got = [p.loss for p in result["search"].probes]
        assert got == pytest.approx([p.loss for p in expected.probes], rel=1e-4, abs=1e-7)


def test_chunked_bounded_compensated_search_matches_one_process(ranks):
    single_loader = D.sharded(SyntheticImages(IMAGES, size=32, seed=SEED), BATCH, seed=SEED, rank=0, world_size=1)
    expected = _search(tiny("open_clip"), single_loader, KLToDense(temp_inv=5.0), compensation="bias")
    for result in ranks:
        got = result["search_bounded"]
        assert got.widths == expected.widths and got.config["memory"]["peak_gb"]["disk"] > 0
        assert [p.loss for p in got.probes] == pytest.approx([p.loss for p in expected.probes], rel=1e-4, abs=1e-7)


def test_a_ragged_last_batch_is_refused_for_scoring(ranks):
    assert all("different numbers of batches" in result["short"] for result in ranks)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("length", [11, 12, 13])
def test_sharded_slices_the_global_batches_without_duplicates(world, drop_last, length):
    def batches(rank, world_size):
        return list(D.ShardedBatchSampler(length, 4, seed=5, drop_last=drop_last, rank=rank, world_size=world_size))

    single = batches(0, 1)
    per_rank = [batches(r, world) for r in range(world)]
    for r, mine in enumerate(per_rank):
        sampler = D.ShardedBatchSampler(length, 4, seed=5, drop_last=drop_last, rank=r, world_size=world)
        assert len(sampler) == len(mine)
    for k, batch in enumerate(single):  # gathering the slices in rank order gives the single-process batch
        assert [i for mine in per_rank if k < len(mine) for i in mine[k]] == batch
    seen = [i for mine in per_rank for batch in mine for i in batch]
    assert len(seen) == len(set(seen))  # never a duplicate, never padding
    assert len(seen) == (length // 4 * 4 if drop_last else length)
    assert sorted(seen) == sorted(i for batch in single for i in batch)


def test_sharded_order_is_seeded_and_changes_with_the_epoch():
    a = D.ShardedBatchSampler(20, 4, seed=1, rank=0, world_size=2)
    b = D.ShardedBatchSampler(20, 4, seed=1, rank=0, world_size=2)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(D.ShardedBatchSampler(8, 4, shuffle=False, rank=1, world_size=2)) == [[2, 3], [6, 7]]


def test_sharded_loader_collates_images_and_labels():
    data = SyntheticImages(5, size=8)
    first, second = (list(D.sharded(data, 4, rank=r, world_size=2)) for r in range(2))
    assert [len(images) for images, _ in first] == [2, 1]  # the 5th image: the last global batch, rank 0's
    assert [len(images) for images, _ in second] == [2]
    images, labels = second[0]
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [-1, -1]


def test_without_a_process_group_everything_is_the_identity(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not D.init_from_env() and not D.is_distributed()
    assert (D.rank(), D.world_size()) == (0, 1)
    x = torch.randn(3, 4, requires_grad=True)
    assert D.gather_with_grad(x) is x
    assert D.all_reduce_sum(x) is x
    features = torch.randn(5, 6)
    criterion = Entropy()
    assert D.GlobalCriterion(criterion)(features, D.GlobalCriterion(criterion).context(None, features)) == criterion(
        features
    )
    with pytest.raises(ValueError, match="cannot give each"):
        D.ShardedBatchSampler(10, 2, rank=0, world_size=3)
