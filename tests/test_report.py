"""report.py: the rendered REPORT.md on a constructed study (tests/test_study.py's make_study), every
cell read from the files, missing ones marked."""
import json

from test_study import S, make_study

import report
import study


def test_report_reads_every_number_from_the_files_and_marks_missing_ones(tmp_path):
    text = report.main(out=str(make_study(tmp_path)), metric="lp", **S)
    md = (tmp_path / "REPORT.md").read_text()
    assert text.startswith("Held") and f"**Verdict.** {text}" in md
    adamw = study.run_name("gsm8k", "1e-4", 2, "adamw", 0)
    row = next(l for l in md.splitlines() if l.startswith(f"| gsm8k | w/o SAM ({adamw})"))
    assert "40.00 (-10.00)" in row and "unavailable" in row and "-0.500 ± " in row and "+1.000 ± " in row
    # Wise-FT, rehearsal, landscapes and calibration were never written: their cells say so
    wise = next(l for l in md.splitlines() if l.startswith("| Wise-FT w/o SAM"))
    assert wise.count("missing") == 7
    assert "| stage 1 | missing | missing | missing |" in md
    assert "| - | stage 1 | not run | unavailable offline |" in md
    sam2 = study.run_name("gsm8k", "1e-4", 1, "sam2", 0)
    assert f"| {sam2} | 2 | missing |" in md                 # rho from its args.json; no metrics.jsonl
    saved = json.loads((tmp_path / "report_args.json").read_text())
    assert saved["rhos"] == ["0.05", "2"]
    assert report.main(out=str(tmp_path)).startswith("Held")    # settings read back from report_args.json
