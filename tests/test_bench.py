"""The benchmark commands run, print ratios from the same run, and reject bad arguments clearly."""

from __future__ import annotations

import pytest
import torch

from beseg.bench.loss import make_inputs, make_loss, parse_shape, peak_extra_bytes
from beseg.cli import main


def _table_rows(out: str) -> dict[str, list[float]]:
    """``{case label: [median ms, runs, x reference, x DiceLoss]}`` from the printed table."""
    from beseg.bench.loss import CASE_LABELS

    rows = {}
    for line in out.splitlines():
        for label in CASE_LABELS.values():
            if line.startswith(label):
                rows[label] = [float(v) for v in line[len(label):].split()[:4]]
    return rows


def test_bench_loss_ratios_are_computed_from_the_times_of_the_same_run(capsys):
    code = main(["bench", "loss", "--shapes", "1,1,12,12,12", "--repeats", "2", "--warmup", "0", "--no-memory"])
    out = capsys.readouterr().out
    assert code == 0
    rows = _table_rows(out)
    ref, dice, fast = (rows[k][0] for k in ("BE reference (paper: 4 conv on P and Y)", "MONAI DiceLoss",
                                             "BE fast (beseg default)"))
    def tolerance(a, b, printed_digits):
        # The times are printed to 0.005 ms and the ratios rounded to `printed_digits` decimals.
        return (a / b) * (0.005 / a + 0.005 / b) + 0.5 * 10 ** -printed_digits

    for label, (ms, _, x_ref, x_dice) in rows.items():
        assert x_ref == pytest.approx(ms / ref, abs=tolerance(ms, ref, 4)), label
        assert x_dice == pytest.approx(ms / dice, abs=tolerance(ms, dice, 1)), label
    summary = next(line for line in out.splitlines() if line.startswith("fast BE is"))
    ratio = float(summary.split()[3].rstrip("x"))
    expected = ref / fast if ref >= fast else fast / ref
    assert ratio == pytest.approx(expected, abs=tolerance(max(ref, fast), min(ref, fast), 1))
    assert ("faster" in summary) == (ref >= fast)


def test_bench_loss_reports_a_slowdown_as_a_slowdown(monkeypatch, capsys):
    import beseg.bench.loss as bench

    fake = {"reference": 0.010, "fast": 0.020, "fast_spacing": 0.015, "pr_style": 0.015, "dice": 0.004,
            "dice_be": 0.030}
    monkeypatch.setattr(bench, "time_case", lambda case, *args, **kwargs: (fake[case], 3))
    bench.run_loss_benchmark(shapes=[(1, 1, 8, 8, 8)], memory=False)
    out = capsys.readouterr().out
    assert "fast BE is 2.0x SLOWER than the reference" in out
    assert "fast BE costs 5.0x MONAI DiceLoss" in out
    assert "spacing-aware fast BE costs 0.75x the default fast BE" in out
    rows = _table_rows(out)
    assert rows["BE fast (beseg default)"][2:] == [2.0, 5.0]


def test_pr_style_module_matches_reference_valid_single_pass():
    pred, label = make_inputs((1, 2, 10, 10, 10))
    pr = make_loss("pr_style")(pred, label)
    ours = make_loss("reference").__class__(include_background=True, smoothing_passes=1, padding="valid", reduction="sum")
    torch.testing.assert_close(pr, ours(pred, label), rtol=1e-5, atol=0)


@pytest.mark.parametrize("text", ["2,1,96", "a,b,c,d,e", "2,1,0,4,4"])
def test_bad_shape_is_a_clear_cli_error(text, capsys):
    assert main(["bench", "loss", "--shapes", text]) == 1
    err = capsys.readouterr().err
    assert "--shapes" in err and "Traceback" not in err


def test_parse_shape():
    assert parse_shape("2,1,96,96,96") == (2, 1, 96, 96, 96)
    assert parse_shape("1x3x8x8") == (1, 3, 8, 8)


@pytest.mark.slow
def test_peak_memory_probe_measures_the_fast_loss_below_four_inputs():
    shape = (1, 1, 48, 48, 48)
    peak = peak_extra_bytes("fast", shape, threads=1, device=torch.device("cpu"))
    input_bytes = 48**3 * 4
    assert peak is not None and 0 < peak < 4 * input_bytes


def test_bench_train_reports_the_be_share_of_a_step(capsys):
    assert main(["bench", "train", "--patch", "16", "16", "16", "--volume", "24", "24", "24", "--repeats", "1",
                 "--init-filters", "8", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "% of a SegResNet + Dice+BE step" in out and "sliding-window inference" in out


@pytest.mark.slow
def test_bench_predict_times_both_runtimes_on_the_same_image(monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from beseg.bench import predict as bench_predict

    # a phantom just over one 64^3 window at 1 mm, so the test stays small
    monkeypatch.setitem(bench_predict.CASES, "phantom", ("phantom-spleen", (81, 81, 27), (0.8, 0.8, 2.5)))
    assert main(["bench", "predict", "--cases", "phantom", "--repeats", "1", "--threads", "1",
                 "--init-filters", "8"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| phantom |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:4] == ["81x81x27", "0.8x0.8x2.5", "64x64x64"]
    torch_s, onnx_s, ratio = map(float, cells[4:7])
    assert torch_s > 0 and onnx_s > 0 and ratio == pytest.approx(onnx_s / torch_s, abs=0.011)
