"""The measured speed a run reports (metrics.json's steady_tokens_per_s): what a long run
sees, so the steps that pay one-off costs are left out, and nothing else is."""

from vramfit.train import steady_rate, window_rate


def marks(steps):
    """(seconds, tokens, new shape) per step -> cumulative marks as Progress records them."""
    out, t, n = [], 0.0, 0
    for dt, tokens, new in steps:
        t, n = t + dt, n + tokens
        out.append((t, n, new))
    return out


def test_steps_meeting_a_new_shape_are_left_out_and_the_rest_kept():
    # Step 1 (warm-up) and step 3 (a new, longer shape) are slow; the others run 1,000 tokens/s.
    m = marks([(5.0, 1000, True), (1.0, 1000, False), (3.0, 1500, True), (1.5, 1500, False), (1.0, 1000, False)])
    assert steady_rate(m) == 3500 / 3.5
    # The old measure keeps step 3's one-off cost: slower.
    assert window_rate(m) == 5000 / 6.5 < steady_rate(m)


def test_a_slow_step_without_a_new_shape_still_counts():
    """Only the first meeting of a shape is excused: a slow step on a known shape is the run's speed."""
    m = marks([(5.0, 1000, True), (1.0, 1000, False), (4.0, 1000, False)])
    assert steady_rate(m) == 2000 / 5.0


def test_every_step_new_falls_back_to_the_window_and_one_step_has_no_rate():
    m = marks([(5.0, 1000, True), (2.0, 1000, True), (2.0, 1000, True)])
    assert steady_rate(m) == window_rate(m) == 2000 / 4.0
    assert steady_rate(marks([(5.0, 1000, True)])) is None
