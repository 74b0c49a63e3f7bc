"""Initial rows as a function of (fid, seed) (trainer.initializers): order-free, and distributed as asked."""
import pytest
import torch

from schemas.spec_types import InitializerKind
from trainer.embedding_table import EmbeddingTable
from trainer.initializers import initial_values
from trainer.table_config import SlotPolicy, TableConfig

FIDS = torch.arange(200_000, dtype=torch.int64) * 7919 + (3 << 48)


@pytest.mark.parametrize("kind, mean, std, bound", [
    (InitializerKind.NORMAL, 0.0, 1.0, None),
    (InitializerKind.TRUNCATED_NORMAL, 0.0, 0.96, 2.0),  # N(0, 1) clamped to +-2 (as before): std 0.96
    (InitializerKind.UNIFORM, 0.0, 3 ** -0.5, 1.0),
])
def test_values_have_the_initializers_distribution(kind, mean, std, bound):
    values = initial_values(FIDS, 8, kind, 0.01, seed=4)
    assert values.dtype == torch.float32 and values.shape == (len(FIDS), 8)
    assert values.mean().item() == pytest.approx(mean * 0.01, abs=2e-5)
    assert values.std().item() == pytest.approx(std * 0.01, rel=0.01)
    if bound is not None:
        assert values.abs().max().item() <= bound * 0.01 + 1e-9
    columns = torch.corrcoef(values[:, :4].T.double())  # columns independent of each other
    assert (columns - torch.eye(4, dtype=torch.float64)).abs().max().item() < 0.01
    assert torch.count_nonzero(initial_values(FIDS[:10], 8, InitializerKind.ZEROS, 0.01, 4)) == 0


def test_a_fids_row_depends_on_fid_and_seed_only():
    one = initial_values(FIDS[:1_000], 4, InitializerKind.NORMAL, 1.0, seed=1)
    shuffled = torch.randperm(1_000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(initial_values(FIDS[:1_000][shuffled], 4, InitializerKind.NORMAL, 1.0, seed=1), one[shuffled])
    assert not torch.equal(initial_values(FIDS[:1_000], 4, InitializerKind.NORMAL, 1.0, seed=2), one)


def test_tables_sharded_by_fid_initialise_as_one_table():
    config = TableConfig(dim=6, slots={3: SlotPolicy(init_scale=0.1)}, initial_buckets=16, seed=5)
    whole, shards = EmbeddingTable(config), [EmbeddingTable(config), EmbeddingTable(config)]
    fids = FIDS[:5_000]
    for batch in torch.split(fids, 700):
        whole.lookup_or_insert(batch, 0)
        for owner, shard in enumerate(shards):
            shard.lookup_or_insert(batch[batch % 2 == owner], 0)
    for owner, shard in enumerate(shards):
        mine = fids[fids % 2 == owner]
        assert torch.equal(shard.gather(shard.lookup(mine)), whole.gather(whole.lookup(mine)))


def test_a_batch_of_mixed_initializers_gives_each_fid_the_row_its_own_initializer_gives():
    from trainer.initializers import initial_rows

    initializers = [(InitializerKind.NORMAL, 0.01), (InitializerKind.ZEROS, 0.5), (InitializerKind.UNIFORM, 0.2),
                    (InitializerKind.TRUNCATED_NORMAL, 1.0)]
    choice = torch.arange(len(FIDS)) % len(initializers)
    mixed = initial_rows(FIDS, 6, initializers, choice, seed=3)
    for code, (kind, scale) in enumerate(initializers):
        at = choice == code
        assert torch.equal(mixed[at], initial_values(FIDS[at], 6, kind, scale, seed=3))
    zeros = mixed[choice == 1]
    assert not torch.signbit(zeros).any(), "a ZEROS row holds -0.0 (scale 0 times a negative draw)"
