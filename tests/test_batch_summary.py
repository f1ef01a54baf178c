"""learnable_memory.batch.summary: the progress bar (throttled in a log) and the summary line."""

from __future__ import annotations

import sys

from learnable_memory.batch.summary import LOG_INTERVAL, Summary, progress_bar


def test_the_progress_bar_is_throttled_in_a_log_and_off_when_asked(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    bar = progress_bar(10, None)
    assert not bar.disable and bar.mininterval == LOG_INTERVAL
    bar.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = progress_bar(10, None)
    assert bar.mininterval < 1 and bar.unit == "img"
    bar.close()
    assert progress_bar(10, False).disable


def test_the_summary_gives_images_per_second_and_the_decode_share():
    s = Summary(images=100, errors=2, skipped=50, wall_s=4.0, decode_s=1.0, model_s=3.0, passes_per_batch=2)
    assert (s.images_per_s, s.decode_share) == (25.0, 0.25)
    assert s.text() == ("labelled 100 images (2 could not be read, 50 already done) in 4.0 s: 25.0 images/s; "
                        "decoding 1.0 s, model 3.0 s (25% decoding, 2 pass(es) per batch)")
    assert s.to_dict()["images_per_s"] == 25.0 and Summary().images_per_s == 0.0 == Summary().decode_share
    ray = Summary(images=8, wall_s=2.0, decode_s=None, model_s=None)  # stages in other processes: not timed
    assert ray.decode_share is None and ray.text().endswith("4.0 images/s; (1 pass(es) per batch)")
