from ingest_stream.core.stall import StallDetector


def test_waiting_without_progress_past_the_timeout_is_a_stall():
    detector = StallDetector(timeout_s=30)
    assert detector.observe(0, {"t:0": (10, 50)}) == []
    assert detector.observe(29, {"t:0": (10, 50)}) == []
    assert detector.observe(30, {"t:0": (10, 50)}) == ["t:0"]


def test_progress_resets_the_clock():
    detector = StallDetector(timeout_s=30)
    detector.observe(0, {"t:0": (10, 50)})
    assert detector.observe(25, {"t:0": (11, 50)}) == []
    assert detector.observe(50, {"t:0": (11, 50)}) == []
    assert detector.observe(55, {"t:0": (11, 50)}) == ["t:0"]


def test_caught_up_is_never_stalled():
    detector = StallDetector(timeout_s=30)
    detector.observe(0, {"t:0": (50, 50)})
    assert detector.observe(100, {"t:0": (50, 50)}) == []
    assert detector.observe(100, {"t:0": (50, 40)}) == []  # a broker under-reporting its end


def test_busy_partitions_are_not_stalled():
    detector = StallDetector(timeout_s=30)
    detector.observe(0, {"t:0": (10, 50)})
    assert detector.observe(40, {"t:0": (10, 50)}, busy={"t:0"}) == []
    assert detector.observe(69, {"t:0": (10, 50)}) == []
    assert detector.observe(70, {"t:0": (10, 50)}) == ["t:0"]


def test_partitions_that_go_away_are_forgotten():
    detector = StallDetector(timeout_s=30)
    detector.observe(0, {"t:0": (10, 50), "t:1": (0, 5)})
    detector.observe(10, {"t:1": (0, 5)})
    assert detector.observe(45, {"t:0": (10, 50), "t:1": (0, 5)}) == ["t:1"]
