from ingest_stream.core.stall import Progress, StallDetector


def waiting(committed: int, end: int) -> Progress:
    return Progress(committed=committed, acked=committed, end=end)


def test_waiting_without_progress_past_the_timeout_is_a_stall():
    detector = StallDetector(timeout_s=30)
    assert detector.observe(0, {"t:0": waiting(10, 50)}) == []
    assert detector.observe(29, {"t:0": waiting(10, 50)}) == []
    assert detector.observe(30, {"t:0": waiting(10, 50)}) == ["t:0"]


def test_progress_resets_the_clock():
    detector = StallDetector(timeout_s=30)
    detector.observe(0, {"t:0": waiting(10, 50)})
    assert detector.observe(25, {"t:0": waiting(11, 50)}) == []
    assert detector.observe(50, {"t:0": waiting(11, 50)}) == []
    assert detector.observe(55, {"t:0": waiting(11, 50)}) == ["t:0"]


def test_caught_up_is_never_stalled():
    detector = StallDetector(timeout_s=30)
    detector.observe(0, {"t:0": waiting(50, 50)})
    assert detector.observe(100, {"t:0": waiting(50, 50)}) == []
    assert detector.observe(100, {"t:0": waiting(50, 40)}) == []  # a broker under-reporting its end


def test_acked_but_never_committed_is_a_stall():
    detector = StallDetector(timeout_s=30)
    stuck = Progress(committed=7, acked=50, end=50)
    detector.observe(0, {"t:0": stuck})
    assert detector.observe(31, {"t:0": stuck}) == ["t:0"]
    first_commit_missing = Progress(committed=None, acked=50, end=50)
    detector.observe(40, {"t:1": first_commit_missing})
    assert detector.observe(71, {"t:1": first_commit_missing}) == ["t:1"]


def test_acks_moving_while_the_commit_is_stuck_are_not_progress():
    """A commit stuck behind a record that is never acked, while the records after it are."""
    detector = StallDetector(timeout_s=30)
    detector.observe(0, {"t:0": Progress(committed=35, acked=700, end=2000)})
    assert detector.observe(20, {"t:0": Progress(committed=35, acked=900, end=2000)}) == []
    assert detector.observe(30, {"t:0": Progress(committed=35, acked=1100, end=2000)}) == ["t:0"]


def test_before_the_first_commit_acks_are_progress():
    detector = StallDetector(timeout_s=30)
    detector.observe(0, {"t:0": Progress(committed=None, acked=10, end=50)})
    assert detector.observe(30, {"t:0": Progress(committed=None, acked=20, end=50)}) == []
    assert detector.observe(59, {"t:0": Progress(committed=None, acked=20, end=50)}) == []
    assert detector.observe(60, {"t:0": Progress(committed=None, acked=20, end=50)}) == ["t:0"]


def test_nothing_known_yet_but_records_waiting_counts_as_behind():
    assert Progress(committed=None, acked=None, end=5).behind
    assert not Progress(committed=None, acked=None, end=0).behind


def test_busy_partitions_are_not_stalled():
    detector = StallDetector(timeout_s=30)
    detector.observe(0, {"t:0": waiting(10, 50)})
    assert detector.observe(40, {"t:0": waiting(10, 50)}, busy={"t:0"}) == []
    assert detector.observe(69, {"t:0": waiting(10, 50)}) == []
    assert detector.observe(70, {"t:0": waiting(10, 50)}) == ["t:0"]


def test_partitions_that_go_away_are_forgotten():
    detector = StallDetector(timeout_s=30)
    detector.observe(0, {"t:0": waiting(10, 50), "t:1": waiting(0, 5)})
    detector.observe(10, {"t:1": waiting(0, 5)})
    assert detector.observe(45, {"t:0": waiting(10, 50), "t:1": waiting(0, 5)}) == ["t:1"]


def test_waiting_reports_how_long_each_behind_partition_went_without_progress():
    detector = StallDetector(timeout_s=30)
    detector.observe(0, {"t:0": waiting(10, 50), "t:1": waiting(5, 5), "t:2": waiting(1, 9)})
    detector.observe(12, {"t:0": waiting(10, 50), "t:1": waiting(5, 5), "t:2": waiting(1, 9)}, busy={"t:2"})
    assert detector.waiting == {"t:0": 12}
    detector.observe(20, {"t:0": waiting(11, 50)})
    assert detector.waiting == {"t:0": 0.0}
