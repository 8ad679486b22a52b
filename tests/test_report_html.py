"""The report as a reader sees it: report.html in a real headless Chromium (Debian's chromium + chromedriver,
driven by Selenium) at a laptop's 1,280 px, with names, machines and reasons as long as real ones."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import require, run_cli
from test_report import _fake_run

WIDTH = 1280
GPU = "NVIDIA H100 80GB HBM3"


def _browser(scratch):
    """Headless Chromium whose profile and temporary files stay in ``scratch``, not in the shared /tmp (a short
    path: Chromium's socket under it must fit the 107 characters of a Unix socket address)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    require(chromium is not None and shutil.which(driver) is not None, "chromium and chromium-driver (Debian)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WIDTH},900", "--hide-scrollbars", f"--user-data-dir={scratch / 'profile'}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver, env={**os.environ, "TMPDIR": str(scratch)}), options=options)


# Each word (whitespace-separated) of a table cell that the browser laid out on more than one line, with its
# column; run names and reasons (paths, long identifiers) may break, a status, number or machine name may not.
BROKEN_WORDS = """
    const broken = [];
    for (const cell of document.querySelectorAll('tbody td')) {
        const header = cell.closest('table').tHead.rows[0].cells[cell.cellIndex].textContent;
        const text = cell.firstChild;
        if (['run', 'reason'].includes(header) || !text || text.nodeType !== Node.TEXT_NODE) continue;
        for (const word of text.data.matchAll(/\\S+/g)) {
            const range = document.createRange();
            range.setStart(text, word.index);
            range.setEnd(text, word.index + word[0].length);
            if (range.getClientRects().length > 1) broken.push([header, word[0]]);
        }
    }
    return broken;"""


def _experiment(root, name, n, status_of=lambda seed: "success"):
    for seed in range(1, n + 1):
        target = {"metric": "val_accuracy", "value": 0.85, "reached": seed != 2, "epochs_to_target": 9,
                  "time_to_target_s": 1234.5 * seed, "energy_to_target_j": 987654.3 * seed,
                  "energy_to_target_above_idle_j": 543210.9 * seed}
        _fake_run(root / name / f"20261204-163848-seed{1000 + seed}", 1000 + seed, 0.8912345, 1234.56789,
                  status=status_of(seed), target=target,
                  energy={"method": "counter", "total_j": 1234567.8, "above_idle_j": 987654.3,
                          "per_epoch_j": [123456.7, 123456.8]})


def test_report_html_fits_a_laptop_screen_with_friendly_names(tmp_path, tmp_path_factory):
    results = tmp_path / "results"
    _experiment(results, "h100-bf16-batch256-xla-global-shuffle", 5, lambda s: "failed" if s == 5 else "success")
    _experiment(results, "a100", 1)
    infer = results / "20261204-163848-seed1001-infer-best-20261204-171502"  # output.root's generic folder
    _fake_run(infer, 1001, 0.8912345, 1234.56789)
    (infer / "manifest.json").write_text(json.dumps({"host": {"hostname": "node7"}, "command": ["cloudmask", "infer"]}))
    done = run_cli("report", str(results))
    assert done.returncode == 0, done.stderr
    page = results / "report" / "report.html"

    browser = _browser(tmp_path_factory.mktemp("chrome"))
    try:
        browser.get(page.as_uri())
        width = browser.execute_script("return document.documentElement.scrollWidth")
        viewport = browser.execute_script("return window.innerWidth")
        text = browser.execute_script("return document.body.innerText")
        align = browser.execute_script("""
            return [...document.querySelectorAll('tbody td')].map(c => [
                c.closest('table').tHead.rows[0].cells[c.cellIndex].textContent, getComputedStyle(c).textAlign]);""")
        broken = browser.execute_script(BROKEN_WORDS)
        browser.save_screenshot(str(tmp_path / "report.png"))
    finally:
        browser.quit()
    assert viewport == WIDTH and width <= viewport, f"page {width} px wide in a {viewport} px window"
    for raw in ("time_per_epoch_s", "gpu_energy_j", "test_accuracy", "olympic_mean"):
        assert raw not in text  # friendly names only
    assert "time per epoch (s)" in text and "olympic mean" in text
    assert not broken, f"words broken across lines: {broken}"  # "succes" / "s" beside a long run name
    assert "infer runs (1 run)" in text and "a100 (1 run)" in text and "(5 runs)" in text and "1 runs" not in text
    by_column: dict[str, set] = {}
    for header, how in align:
        by_column.setdefault(header, set()).add(how)
    for header in ("run", "status", "machine", "GPU", "metric", "reason"):
        assert by_column[header] <= {"left", "start"}, (header, by_column[header])
    for header in ("seed", "test accuracy", "time per epoch (s)", "GPU energy (J)", "mean", "n"):
        assert by_column[header] == {"right"}, (header, by_column[header])
