"""The one clean-stop rule (simcse_dist/cli/status.py) and the scripts that use it."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from helpers import REPO

from simcse_dist.cli.status import clean_stop


def test_a_recorded_clean_end_turns_a_launcher_failure_into_0(tmp_path):
    status = tmp_path / "status"
    assert clean_stop(1, str(status)) == (1, None)  # nothing recorded
    status.write_text(json.dumps({"status": "stopped", "step": 12}))
    code, why = clean_stop(1, str(status))
    assert code == 0 and "exited 1 after the trainer ended cleanly" in why and '"step": 12' in why
    assert clean_stop(0, str(status)) == (0, None)
    status.write_text(json.dumps({"status": "failed"}))
    assert clean_stop(3, str(status)) == (3, None)
    status.write_text("not json")
    assert clean_stop(3, str(status)) == (3, None)
    proc = subprocess.run(
        [sys.executable, "-m", "simcse_dist.cli.status", "1"],
        capture_output=True,
        text=True,
        env={"SIMCSE_STATUS_FILE": str(tmp_path / "none")},
    )
    assert proc.returncode == 1


def test_the_scripts_share_the_rule_and_their_comments_name_real_users():
    scripts = {
        p.relative_to(REPO).as_posix(): p.read_text()
        for p in [*(REPO / "launch").glob("*.sh"), REPO / "slurm" / "train.sh"]
    }
    # no script carries its own copy of the rule: each asks simcse_dist.cli.status
    assert not [name for name, text in scripts.items() if re.search(r"^\s*clean_stop\s*\(\)", text, re.M)]
    assert (
        "simcse_dist.cli.status" in scripts["launch/common.sh"]
        and "simcse_dist.cli.status" in scripts["slurm/train.sh"]
    )
    # launch/common.sh names who sources it: each of them does, and nobody else
    header = scripts["launch/common.sh"].split("\n\n")[0]
    named = set(re.findall(r"launch/[\w-]+\.sh", header.split(":")[0]))
    sourcing = {name for name, text in scripts.items() if "source launch/common.sh" in text}
    assert named == sourcing and named, (named, sourcing)
