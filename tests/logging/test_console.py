from feddymem.logging.console import Reporter, human_bytes, progress_enabled


def test_bars_advance_and_finish_in_any_order():
    reporter = Reporter(quiet=False)
    reporter.show_bars = True  # as on a terminal
    with reporter.bars():
        first, second = reporter.task("first", 2), reporter.task("second", 1)
        first(1)
        first(1)  # the first bar is full and removed ...
        second(1)  # ... which must not break the next one
        assert reporter._progress.tasks == []


def test_quiet_under_ci_or_flag(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert not progress_enabled(quiet=False)
    monkeypatch.delenv("CI")
    assert not progress_enabled(quiet=True)
    assert Reporter(quiet=True).task("x", 3)(1) is None  # a no-op callback


def test_human_bytes():
    assert human_bytes(512) == "512 B" and human_bytes(479_846) == "468.6 KB" and human_bytes(3 * 2**30) == "3.0 GB"
