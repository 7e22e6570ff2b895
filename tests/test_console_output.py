"""Console output and epoch numbering: one bar that finishes (terminal, notebook), plain per-epoch lines when
stdout is a file, and epochs counted from 1 alike in history.jsonl, steps.jsonl, summary.json and `show`."""
from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import nbformat
import pytest

from tdro.runs import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"epochs": 2, "batch_size": 64, "latent_dim": 8, "head_hidden": 0, "latent_samples_per_group": 30,
         "log_interval": 2, "digits_sizes": [200, 60]}
EPOCH_LINE = re.compile(r"^epoch (\d+)/2: val worst-group acc [0-9.]+ \(\w+\), mean acc [0-9.]+, .*s", re.M)


def train_command(tmp_path: Path, name: str, **keys) -> list[str]:
    command = [sys.executable, "-m", "tdro", "train", "-p", "output_dir", str(tmp_path / "runs"),
               "-p", "run_name", name]
    for key, value in {**SMALL, **keys}.items():
        command += ["-p", key, json.dumps(value)]
    return command


def as_displayed(text: str) -> list[str]:
    """Lines as a terminal (or JupyterLab) shows them: each carriage return starts the line over."""
    return [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]


def test_cli_redirected_to_a_file_gets_epoch_lines_and_no_bar_frames(tmp_path):
    log = tmp_path / "train.log"
    with open(log, "w") as handle:
        done = subprocess.run(train_command(tmp_path, "logged", progress=True, algorithm="groupdro"), cwd=ROOT,
                              stdout=handle, stderr=subprocess.PIPE, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = log.read_text()
    assert "\r" not in text and "\r" not in done.stderr, "no bar frames in a log"
    assert [int(e) for e in EPOCH_LINE.findall(text)] == [1, 2]
    assert re.search(r"^epoch 1/2: .*, q\[\w+\] 0\.500, ", text, re.M), "GroupDRO's q of the worst group"


def test_cli_on_a_terminal_shows_one_bar_that_finishes(tmp_path):
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(train_command(tmp_path, "tty", progress=True), cwd=ROOT, stdout=follower,
                               stderr=subprocess.PIPE)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=600)
    os.close(leader)
    assert process.returncode == 0, process.stderr.read().decode()[-3000:]
    raw = b"".join(chunks).decode()
    assert "\r" in raw, "a terminal gets a live bar"
    lines = [line for line in as_displayed(raw) if line.strip()]
    bars = [line for line in lines if re.search(r"\d+/\d+ \[", line)]
    assert len(bars) == 1 and "100%" in bars[0], f"one finished bar, not one per epoch: {bars}"
    assert [int(e) for e in EPOCH_LINE.findall("\n".join(lines))] == [1, 2]
    assert lines.index(bars[0]) > max(i for i, line in enumerate(lines) if line.startswith("epoch 2/2: val"))


def test_epochs_count_from_one_in_every_record_and_in_show(tmp_path):
    done = subprocess.run(train_command(tmp_path, "numbered", progress=True, epochs=3, early_stopping_patience=0),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "numbered"
    history = read_jsonl(run / "history.jsonl")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    steps = read_jsonl(run / "steps.jsonl")
    assert steps[0]["epoch"] == 1 and steps[-1]["epoch"] == 3 and {s["epoch"] for s in steps} <= {1, 2, 3}
    assert sorted(p.name for p in (run / "latents").iterdir()) == ["epoch_001.npz", "epoch_002.npz", "epoch_003.npz"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_run"] == 3
    best = max(history, key=lambda r: (r["monitor"]["value"], -r["epoch"]))
    assert summary["selected_epoch"] == best["epoch"] and summary["monitor_value"] == best["monitor"]["value"]
    shown = subprocess.run([sys.executable, "-m", "tdro", "show", str(run)], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"selected epoch {best['epoch']} of 3 by val_worst_group_acc (val)")
    assert f"selected epoch {best['epoch']} of 3" in done.stdout
    assert [int(e) for e in re.findall(r"^epoch (\d+)/3:", done.stdout, re.M)] == [1, 2, 3]


@pytest.mark.slow
def test_papermill_executed_train_notebook_has_one_finished_bar_and_no_stale_ones(tmp_path):
    import papermill

    from tdro.reports import export_html

    os.environ["MPLBACKEND"] = "agg"
    from jupyter_client.kernelspec import find_kernel_specs

    kernel = "tdro" if "tdro" in find_kernel_specs() else "python3"
    out = tmp_path / "train.ipynb"
    papermill.execute_notebook(str(ROOT / "notebooks" / "train.ipynb"), str(out), kernel_name=kernel, cwd=str(ROOT),
                               progress_bar=False, parameters={"output_dir": str(tmp_path / "runs"), "run_name": "nb",
                                                               "progress": True, **SMALL})
    nb = nbformat.read(out, as_version=4)
    (cell,) = [c for c in nb.cells if c.cell_type == "code" and "train(config)" in c.source]
    text = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")
    lines = [line for line in as_displayed(text) if line.strip()]
    bars = [line for line in lines if re.search(r"\d+/\d+ \[", line)]
    assert len(bars) == 1 and "100%" in bars[0], f"one finished bar: {bars}"
    assert [int(e) for e in EPOCH_LINE.findall("\n".join(lines))] == [1, 2]
    widgets = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    assert not [m for m in widgets.values() if m["model_name"] == "FloatProgressModel"], "no widget bars left"
    html = export_html(out).read_text()
    assert "\r" not in html and " 0%|" not in html, "the report shows the bar's last frame only"
    assert html.count("100%|") == 1
