"""The end-of-run report where matplotlib is missing: the markdown is written, the plots are skipped with a
note, and the run does not fail at its very end."""
import sys

from raychat.config import TrainConfig, derive
from raychat.report import render_report


def test_report_without_matplotlib_is_written_without_its_plots(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    cfg = TrainConfig(depth=2, aspect_ratio=32, head_dim=32, max_seq_len=64, device_batch_size=4,
                      total_batch_size=512, num_iterations=4, run_name="no-plots", device_type="cpu")
    summary = {"val_bpb": 2.5, "min_val_bpb": 2.5, "core_metric": None, "mfu": 0.0, "device_type": "cpu",
               "total_training_flops": 1e9, "total_training_time": 60.0, "peak_memory_mib": 512.0}
    history = {"train_loss": [[0, 6.0], [1, 5.0]], "val_bpb": [[0, 3.0], [4, 2.5]], "core_metric": []}
    text = render_report(cfg, derive(cfg, 512, 1), summary, history, str(tmp_path))
    assert (tmp_path / "report.md").read_text() == text
    assert "Minimum validation bpb" in text and "![" not in text
    assert "Plots skipped: matplotlib is not installed" in text
    assert not list(tmp_path.glob("*.png"))
