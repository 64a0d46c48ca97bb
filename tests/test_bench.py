"""The benchmark commands run, print ratios from the same run, and reject bad arguments clearly."""

from __future__ import annotations

import pytest
import torch

from beseg.bench.loss import make_inputs, make_loss, parse_shape, peak_extra_bytes
from beseg.cli import main


def test_bench_loss_prints_ratios_from_one_run(capsys):
    code = main(["bench", "loss", "--shapes", "1,1,12,12,12", "--repeats", "1", "--warmup", "0", "--no-memory"])
    out = capsys.readouterr().out
    assert code == 0
    assert "x reference" in out and "x DiceLoss" in out
    assert "fast BE is" in out and "faster than the reference" in out
    assert "BE author's PR style" in out and "DiceBELoss" in out


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
