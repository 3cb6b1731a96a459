"""bench/prepare_scale.py's small-files arm: the layouts take turns, the GOAL is the ratio of the medians, and every
run is shown (a flow's wall time is rounded up to whole seconds, so one run per layout is not a measurement)."""

from __future__ import annotations

import re

import pytest

from bench import prepare_scale


def scripted_spawn(walls: dict[str, list[float]], calls: list[str]):
    """A stand-in for bench/prepare.py's `spawn`: each layout's runs return the next of its scripted wall times."""
    left = {name: iter(w) for name, w in walls.items()}

    def spawn(kind: str, log_path, corpus: str, work: str) -> dict:
        name = "few" if "/few-" in corpus else "many"
        calls.append(name)
        return {"wall_s": next(left[name]), "decisions": [("doc", "kept", "")], "input_docs": 12, "kept_docs": 12}

    return spawn


def test_layouts_take_turns_and_the_goal_is_the_ratio_of_the_medians(tmp_path):
    calls: list[str] = []
    walls = {"few": [3.1, 4.1, 3.1], "many": [4.1, 5.1, 5.1]}
    lines = prepare_scale.small_files_arm(tmp_path, 12, scripted_spawn(walls, calls), tmp_path / "log", rounds=3)
    assert calls == ["few", "many"] * 3
    assert len(list((tmp_path / "small-12").rglob("*.txt"))) == 12 and len(list((tmp_path / "few-12").iterdir())) == 10
    [goal] = [line for line in lines if line.startswith("GOAL")]
    assert float(re.search(r"files\s+([\d.]+)", goal).group(1)) == pytest.approx(5.1 / 3.1, abs=1e-3)
    assert goal.endswith("FAIL")  # 1.645 > 1.5
    text = "\n".join(lines)
    assert "4.10, 5.10, 5.10" in text and "3.10, 4.10, 3.10" in text  # every run shown
    assert "ratio per round: 1.323, 1.244, 1.645" in text


def test_no_round_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--rounds 0"):
        prepare_scale.small_files_arm(tmp_path, 12, scripted_spawn({}, []), tmp_path / "log", rounds=0)
