"""What a run costs and records: eval_batch_size chosen by device (explicit values kept); the run's own memory
(peak RSS above the post-import baseline on CPU) next to the process's peak RSS."""
import json

import torch

from tdro.config import Config
from tdro.runs import read_jsonl
from tdro.training.evaluation import eval_batch_size, forward_only
from tdro.training.trainer import peak_memory_mb, run_memory_mb, train


def test_default_eval_batch_size_is_chosen_by_device():
    assert Config().eval_batch_size is None
    assert eval_batch_size(None, torch.device("cpu")) == 128  # as fast as 1024 on CPU, in less memory
    assert eval_batch_size(None, torch.device("cuda")) == 1024
    assert eval_batch_size(512, torch.device("cpu")) == 512
    assert Config(eval_batch_size=64).eval_batch_size == 64


def test_evaluation_batches_follow_the_resolved_size():
    from tdro.data.base import Group, GroupedDataset, Split

    sizes = []

    class Model(torch.nn.Module):
        def forward(self, inputs):
            (name, x), = inputs.items()
            sizes.append(len(x))
            return {name: x}, {name: x}

    split = Split(torch.zeros(300, 2), torch.zeros(300, dtype=torch.long))
    dataset = GroupedDataset("toy", {"g": Group("g", "tabular", "mlp_tabular", {"input_dim": 2}, {}, split, split, split)},
                             ["a", "b"])
    assert forward_only(Model(), dataset, "val", "cpu", None) == 300 and sizes == [128, 128, 44]
    sizes.clear()
    assert forward_only(Model(), dataset, "val", "cpu", 200) == 300 and sizes == [200, 100]


def test_run_memory_is_the_peak_rss_above_the_baseline_on_cpu():
    peak = peak_memory_mb(torch.device("cpu"))
    assert run_memory_mb(torch.device("cpu"), peak - 30.0) == 30.0
    assert run_memory_mb(torch.device("cpu"), peak + 1.0) == 0.0  # an earlier, larger peak in this process


def test_history_and_summary_record_the_runs_own_memory_next_to_the_rss(tmp_path):
    result = train(Config(output_dir=str(tmp_path), run_name="run", epochs=1, progress=False))
    (record,) = read_jsonl(result.run_dir / "history.jsonl")
    summary = json.loads((result.run_dir / "summary.json").read_text())
    for values in (record, summary):
        assert 0.0 <= values["run_memory_mb"] < values["peak_memory_mb"]
