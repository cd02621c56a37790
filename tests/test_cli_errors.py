"""The commands other than the launcher: a missing path or an empty output root is one line and exit 2."""

import pytest

from analysis import figures
from scaling import evaluate, results, status


@pytest.mark.parametrize("command", ["status", "results", "evaluate", "figures"])
@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_missing_path_or_an_empty_root_is_one_line_and_exit_2(tmp_path, capsys, command, where):
    path = tmp_path / ("nope" if where == "missing" else "root")
    if where == "empty":
        (path / "runs").mkdir(parents=True)
    argv = {"status": [str(path)], "results": [str(path), "-o", str(tmp_path / "t.csv")],
            "evaluate": [str(path)], "figures": [str(path), "-o", str(tmp_path / "figs")]}[command]
    main = {"status": status.main, "results": results.main, "evaluate": evaluate.main, "figures": figures.main}[command]
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], captured
    assert not (tmp_path / "t.csv").exists() and not (tmp_path / "figs").exists()
