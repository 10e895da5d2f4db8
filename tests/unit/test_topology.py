import pytest

from bimdist.distributed.topology import Topology, TopologyError, blocks_of_stage, check_world


@pytest.mark.parametrize("stages,replicas", [(1, 1), (2, 1), (4, 1), (2, 2), (3, 4)])
def test_rank_coord_roundtrip(stages, replicas):
    topo = Topology(stages, replicas)
    seen = set()
    for rank in range(topo.world_size):
        c = topo.coord(rank)
        assert topo.rank(c.stage, c.replica) == rank
        seen.add((c.stage, c.replica))
    assert len(seen) == stages * replicas


def test_replica_major_layout_keeps_a_pipeline_on_consecutive_ranks():
    topo = Topology(4, 2)
    assert [topo.rank(s, 1) for s in range(4)] == [4, 5, 6, 7]
    assert topo.stage_group(2) == [2, 6]
    assert topo.links() == [(0, 1), (1, 2), (2, 3), (4, 5), (5, 6), (6, 7)]
    assert topo.prev_rank(4) is None and topo.next_rank(4) == 5 and topo.next_rank(7) is None


def test_blocks_split_over_stages():
    assert blocks_of_stage(4, 2, 1) == [2, 3]
    assert blocks_of_stage(4, 4, 3) == [3]
    with pytest.raises(TopologyError, match="do not split"):
        blocks_of_stage(4, 3, 0)


def test_world_size_mismatch_names_the_fix():
    with pytest.raises(TopologyError, match=r"started 3 processes .* 2 x 2 = 4"):
        check_world(3, 2, 2)
    with pytest.raises(TopologyError):
        Topology(2, 1).coord(2)
