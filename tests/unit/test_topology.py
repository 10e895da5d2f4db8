import pytest

from bimdist.distributed.topology import Piece, Topology, TopologyError, blocks_of_stage, check_world


@pytest.mark.parametrize("stages,replicas", [(1, 1), (2, 1), (4, 1), (2, 2), (3, 4), (4, [3, 2, 2, 1]), (2, [1, 3])])
def test_rank_coord_roundtrip(stages, replicas):
    topo = Topology(stages, replicas)
    seen = set()
    for rank in range(topo.world_size):
        c = topo.coord(rank)
        assert topo.rank(c.stage, c.replica) == rank
        seen.add((c.stage, c.replica))
    assert len(seen) == topo.world_size == sum(topo.counts)


def test_replica_major_layout_keeps_a_pipeline_on_consecutive_ranks():
    topo = Topology(4, 2)
    assert topo.counts == (2, 2, 2, 2) and topo.uniform
    assert [topo.rank(s, 1) for s in range(4)] == [4, 5, 6, 7]
    assert topo.stage_group(2) == [2, 6]
    assert topo.links(batch=16) == [(0, 1), (1, 2), (2, 3), (4, 5), (5, 6), (6, 7)]
    assert topo.upstream(4, 16) == [] and topo.downstream(4, 16) == [Piece(5, 8, 16)]
    assert topo.downstream(7, 16) == []


def test_uneven_counts_lay_out_replica_major_as_far_as_they_go():
    topo = Topology(4, [3, 2, 2, 1])
    # replica 0 of every stage, then replica 1 of stages 0-2, then replica 2 of stage 0
    assert [(c.stage, c.replica) for c in map(topo.coord, range(8))] == [
        (0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1), (2, 1), (0, 2)]
    assert topo.stage_group(0) == [0, 4, 7] and topo.stage_group(3) == [3]
    assert topo.layout(12).split()[:2] == ["0=s0r0[0:4]", "1=s1r0[0:6]"]


def test_rows_go_to_every_replica_that_owns_them():
    topo = Topology(2, [3, 2])  # batch 12: stage 0 owns 0:4, 4:8, 8:12; stage 1 owns 0:6, 6:12
    s0 = topo.stage_group(0)
    s1 = topo.stage_group(1)
    assert topo.downstream(s0[0], 12) == [Piece(s1[0], 0, 4)]
    assert topo.downstream(s0[1], 12) == [Piece(s1[0], 4, 6), Piece(s1[1], 6, 8)]
    assert topo.upstream(s1[1], 12) == [Piece(s0[1], 6, 8), Piece(s0[2], 8, 12)]
    for rank in s1:  # every replica gets exactly its rows, in order, from the pieces
        lo, hi = topo.rows(1, topo.coord(rank).replica, 12)
        pieces = topo.upstream(rank, 12)
        assert pieces[0].start == lo and pieces[-1].stop == hi
        assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))
    sent = sorted((r, p.peer, p.start, p.stop) for r in s0 for p in topo.downstream(r, 12))
    got = sorted((p.peer, r, p.start, p.stop) for r in s1 for p in topo.upstream(r, 12))
    assert sent == got  # what each sends is what the other expects


def test_a_bad_count_list_is_named():
    with pytest.raises(TopologyError, match=r"\[2, 0\] must give 2 counts of at least 1"):
        Topology(2, [2, 0])
    with pytest.raises(TopologyError, match="must give 3 counts"):
        Topology(3, [1, 1])


def test_blocks_split_over_stages():
    assert blocks_of_stage(4, 2, 1) == [2, 3]
    assert blocks_of_stage(4, 4, 3) == [3]
    with pytest.raises(TopologyError, match="do not split"):
        blocks_of_stage(4, 3, 0)


def test_world_size_mismatch_names_the_fix():
    with pytest.raises(TopologyError, match=r"started 3 processes .* 2 x 2 = 4"):
        check_world(3, 2, 2)
    with pytest.raises(TopologyError, match=r"the sum of pipeline.replicas \[2, 1\] = 3"):
        check_world(2, 2, [2, 1])
    with pytest.raises(TopologyError):
        Topology(2, 1).coord(2)
