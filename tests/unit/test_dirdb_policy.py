"""The directory database's failover decisions (``_dirdb_policy``): pure logic."""

from __future__ import annotations

from photostack.service.directory._dirdb_policy import (
    MemberSample,
    PeerView,
    PrimaryState,
    StandbyState,
    current_primary,
    decide,
    standby_names_change,
    synchronous_standbys,
)

NODES = ("directory-1", "directory-2")
P, R1, R2 = "directory-1-primary", "directory-1-replica-1", "directory-1-replica-2"


def view(node: str, down: float | None, sync: tuple[str, ...] = (R1,), gen: int = 1) -> PeerView:
    return PeerView(node, P, gen, down, sync)


def standby(name: str, lsn: int, *, streaming: bool = False) -> MemberSample:
    return MemberSample(name, True, in_recovery=True, receive_lsn=lsn, streaming=streaming)


DEAD = MemberSample(P, False)


def test_the_primary_is_the_member_naming_itself_with_the_highest_generation() -> None:
    old = MemberSample(P, True, generation=1, names=P)
    new = MemberSample(R1, True, generation=2, names=R1)
    assert current_primary([old, new]) == (R1, 2)
    # a member whose row names another one (a copy of the old primary's row) is not primary
    assert current_primary([MemberSample(R1, True, generation=1, names=P)]) is None
    # standbys and unreachable members never are
    assert current_primary([standby(R1, 5), MemberSample(R2, False)]) is None


def test_an_old_primary_back_with_its_own_data_is_below_the_floor() -> None:
    old = MemberSample(P, True, generation=1, names=P)
    assert current_primary([old], floor=2) is None
    assert current_primary([old], floor=1) == (P, 1)


def test_both_nodes_down_long_enough_the_lowest_name_promotes_the_sync_standby() -> None:
    views = {n: view(n, 1.5) for n in NODES}
    samples = [DEAD, standby(R1, 100)]
    first = decide("directory-1", NODES, views, samples, 1.0)
    assert (first.action, first.candidate) == ("promote", R1)
    assert decide("directory-2", NODES, views, samples, 1.0).action == "wait"


def test_two_nodes_partitioned_from_each_other_never_promote() -> None:
    views = {"directory-1": view("directory-1", 5.0), "directory-2": None}
    decision = decide("directory-1", NODES, views, [DEAD, standby(R1, 100)], 1.0)
    assert decision.action == "wait"
    assert "1 of 2" in decision.reason


def test_three_nodes_a_majority_is_enough() -> None:
    nodes = (*NODES, "directory-3")
    views = {"directory-1": view("directory-1", 2.0), "directory-2": view("directory-2", 2.0)}
    views["directory-3"] = None
    assert decide("directory-1", nodes, views, [DEAD, standby(R1, 9)], 1.0).action == "promote"


def test_one_node_seeing_the_primary_up_blocks_it() -> None:
    views = {"directory-1": view("directory-1", 3.0), "directory-2": view("directory-2", None)}
    decision = decide("directory-1", NODES, views, [DEAD, standby(R1, 100)], 1.0)
    assert decision.action == "wait"
    assert "directory-2" in decision.reason


def test_not_down_long_enough_flapping_waits() -> None:
    views = {"directory-1": view("directory-1", 2.0), "directory-2": view("directory-2", 0.3)}
    assert decide("directory-1", NODES, views, [DEAD, standby(R1, 1)], 1.0).action == "wait"


def test_a_streaming_standby_sees_the_primary_up() -> None:
    views = {n: view(n, 2.0) for n in NODES}
    samples = [DEAD, standby(R1, 1, streaming=True)]
    decision = decide("directory-1", NODES, views, samples, 1.0)
    assert decision.action == "wait"
    assert "stream" in decision.reason


def test_only_a_standby_synchronous_at_every_nodes_last_sample_is_promoted() -> None:
    # R2 is ahead but was asynchronous at directory-2's last sample: it may lack nothing, but
    # nothing guarantees it holds every acknowledged map version, so R1 is chosen
    views = {"directory-1": view("directory-1", 2.0, (R1, R2)), "directory-2": view(NODES[1], 2.0)}
    samples = [DEAD, standby(R1, 10), standby(R2, 20)]
    decision = decide("directory-1", NODES, views, samples, 1.0)
    assert (decision.action, decision.candidate) == ("promote", R1)
    # among synchronous ones, the most advanced
    views = {n: view(n, 2.0, (R1, R2)) for n in NODES}
    assert decide("directory-1", NODES, views, samples, 1.0).candidate == R2


def test_no_synchronous_standby_means_no_promotion() -> None:
    views = {n: view(n, 2.0, ()) for n in NODES}
    decision = decide("directory-1", NODES, views, [DEAD, standby(R1, 10)], 1.0)
    assert decision.action == "no_candidate"
    views = {n: view(n, 2.0) for n in NODES}
    decision = decide("directory-1", NODES, views, [DEAD, MemberSample(R1, False)], 1.0)
    assert (decision.action, decision.reason) == ("no_candidate", "no standby reachable")


def test_nodes_disagreeing_on_the_generation_wait() -> None:
    views = {"directory-1": view("directory-1", 2.0), "directory-2": view(NODES[1], 2.0, gen=2)}
    decision = decide("directory-1", NODES, views, [DEAD, standby(R1, 10)], 1.0)
    assert decision.action == "wait"
    assert "disagree" in decision.reason


def test_the_primary_up_means_nothing_to_do() -> None:
    views = {n: view(n, None) for n in NODES}
    assert decide("directory-1", NODES, views, [standby(R1, 1)], 1.0).action == "none"


def primary_state(names: str, flush: int, **standbys: tuple[str, str, int]) -> PrimaryState:
    rows = {n.replace("_", "-"): StandbyState(*row) for n, row in standbys.items()}
    return PrimaryState(flush, names, rows)


def test_a_standby_counts_as_synchronous_only_when_streaming_sync_over_two_samples() -> None:
    before = primary_state("FIRST 1", 100, r1=("streaming", "sync", 100))
    now = primary_state("FIRST 1", 150, r1=("streaming", "sync", 150))
    assert synchronous_standbys(before, now) == ("r1",)
    assert synchronous_standbys(None, now) == ()  # one sample is not enough
    # became synchronous just now (after asynchronous commits): not yet
    was_async = primary_state("", 100, r1=("streaming", "async", 100))
    assert synchronous_standbys(was_async, now) == ()
    catching_up = primary_state("FIRST 1", 150, r1=("catchup", "sync", 150))
    assert synchronous_standbys(before, catching_up) == ()


def test_the_primary_drops_to_asynchronous_alone_and_comes_back_with_a_standby() -> None:
    wanted = 'FIRST 1 ("r1")'
    sync = primary_state(wanted, 1)
    alone = primary_state("", 1)
    assert standby_names_change(sync, wanted, 0.0, 0.5, 1.0) is None  # not alone long enough
    assert standby_names_change(sync, wanted, 0.0, 1.0, 1.0) == ""
    assert standby_names_change(alone, wanted, 0.5, 0.0, 1.0) is None  # streaming too briefly
    assert standby_names_change(alone, wanted, 1.0, 0.0, 1.0) == wanted
    assert standby_names_change(sync, wanted, 5.0, 0.0, 1.0) is None
    assert standby_names_change(alone, "", 5.0, 0.0, 1.0) is None  # no standby configured
