"""The comparison report of ``beseg compare``: Table 1, paired statistics, cost and figures.

:func:`write_report` reads only the run folders of a results directory (see
:mod:`beseg.report.collect` for the exact files) and the dataset folder (for figure images), and
writes ``report.md``, a self-contained ``report.html`` and ``figures/*.png``.
"""

from __future__ import annotations

from pathlib import Path

from beseg.report.collect import Results, Run, collect_results
from beseg.report.document import build_document
from beseg.report.render import to_html, to_markdown
from beseg.report.stats import PairedComparison, paired_comparison

__all__ = ["write_report", "collect_results", "Results", "Run", "paired_comparison", "PairedComparison"]


def write_report(
    results_dir: str | Path,
    data_dir: str | Path | None,
    out_dir: str | Path | None = None,
    baseline: str = "segresnet_dice",
    be_system: str = "segresnet_be",
    seed: int = 0,
) -> Path:
    """Write the comparison report of a ``beseg compare`` results folder.

    Args:
        results_dir: folder with ``<system>/seed<k>/`` run folders.
        data_dir: the dataset folder (MSD layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/``) the
            runs used, for the figures' images and labels; None leaves Figure 1 out.
        out_dir: where to write; default ``results_dir/report``.
        baseline: the system every other one is compared with (paired per case).
        be_system: the system shown beside the baseline in the contour figure.
        seed: seed of the bootstrap intervals (same seed, same report).

    Returns:
        Path of the written ``report.html`` (``report.md`` and ``figures/`` are beside it).

    Raises:
        ReportError: the results folder is missing, has no finished run, or its runs disagree on
            the task or classes. Unfinished runs and figure problems are notes in the report.
    """
    results = collect_results(results_dir)
    out = Path(out_dir) if out_dir is not None else Path(results_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    blocks = build_document(results, data_dir, out / "figures", baseline=baseline, be_system=be_system, seed=seed)
    (out / "report.md").write_text(to_markdown(blocks, out / "report.md"), encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(to_html(blocks, f"beseg comparison report: {results.task}"), encoding="utf-8")
    return html_path
