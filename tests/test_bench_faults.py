"""bench/faults.py: a kill that comes after the run saved its final checkpoint is reported as missed, not as a pass.

The commands are real processes standing in for a training run at the three moments that matter: still training
(the kill lands), already ended, and alive but done (its final checkpoint written, closing its log).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import faults  # noqa: E402

# a stand-in run: logs step 2 to metrics.jsonl, optionally points checkpoints/latest at step-000003, then lives on
RUN = """
import json, pathlib, sys, time
run = pathlib.Path(sys.argv[1])
(run / "checkpoints").mkdir(parents=True, exist_ok=True)
if sys.argv[2] == "final":
    (run / "checkpoints" / "latest").write_text("step-000003")
(run / "metrics.jsonl").write_text(json.dumps({"step": 2}) + "\\n")
time.sleep(60)
"""


def test_a_kill_is_missed_when_the_run_had_ended_or_saved_its_final_checkpoint(tmp_path: Path) -> None:
    training, done = tmp_path / "training", tmp_path / "done"
    landed, _ = faults.kill_attempt([sys.executable, "-c", RUN, str(training), "-"], training, 2, 0.0, steps=3)
    assert landed
    ended, _ = faults.kill_attempt([sys.executable, "-c", "pass"], tmp_path / "ended", 2, 0.2, steps=3)
    assert not ended
    closing, seconds = faults.kill_attempt([sys.executable, "-c", RUN, str(done), "final"], done, 2, 0.0, steps=3)
    assert not closing and seconds < 30  # (killed, not waited for)
