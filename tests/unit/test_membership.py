import pytest

from resilient_ep.membership import Membership, MembershipView, RankState, StaleEpochError


def test_fail_and_join_raise_epoch_monotonically():
    m = Membership(4)
    ptr = m.live_mask.data_ptr()
    assert m.epoch == 0 and m.view().live_ranks == (0, 1, 2, 3)
    v = m.fail([2])
    assert v.epoch == 1 and v.live_ranks == (0, 1, 3) and v.states[2] is RankState.DEAD
    v = m.fail([1], state=RankState.FENCED)
    assert v.epoch == 2 and v.states[1] is RankState.FENCED
    assert m.fail([2]).epoch == 2, "failing a rank that is already out changes nothing"
    m.begin_join([2])
    assert m.state(2) is RankState.JOINING and m.epoch == 2
    v = m.join([2])
    assert v.epoch == 3 and v.live_ranks == (0, 2, 3)
    assert m.live_mask.tolist() == [True, False, True, True]
    assert m.live_mask.data_ptr() == ptr


def test_stale_messages_are_recognised():
    m = Membership(3)
    m.fail([0])
    assert m.is_stale(0) and not m.is_stale(1)
    with pytest.raises(StaleEpochError) as ei:
        m.check_epoch(0)
    assert ei.value.got == 0 and ei.value.current == 1
    m.check_epoch(1)


def test_adopt_only_newer_views():
    m = Membership(3)
    newer = MembershipView(5, (RankState.LIVE, RankState.DEAD, RankState.LIVE))
    assert m.adopt(newer) and m.epoch == 5 and m.live_mask.tolist() == [True, False, True]
    assert not m.adopt(MembershipView(4, (RankState.LIVE,) * 3))
    assert m.epoch == 5


def test_bad_ranks():
    m = Membership(2)
    with pytest.raises(ValueError, match="rank 5 out of range"):
        m.fail([5])
    with pytest.raises(ValueError):
        Membership(0)
