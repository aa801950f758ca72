"""compare: numbers against float64 recomputation, a planted Appendix G case, and the report files."""

import csv
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch
from torch import nn

import octavcal
from octavcal import CalibrationConfig
from octavcal.compare import compare, comparison_summary, summarize
from octavcal.core import Batch, LoadedModel
from octavcal.data import load_data, plan_batches
from octavcal.loading import load_model
from octavcal.metrics import significant_minima
from octavcal.report import write_report


def sources(paths, count=3, held=2, batch_size=16):
    data = load_data(paths["data"])
    plan = plan_batches(data.num_samples, batch_size, count, 0)
    held_plan = plan_batches(data.num_samples, batch_size, held, 0, skip=count)
    return (
        (lambda: (data.batch(i) for i in plan)),
        (lambda: (data.batch(i) for i in held_plan)),
        data,
        plan,
        held_plan,
    )


def float64_mse_and_sqnr(xs, amax, qmax, signed):
    sse, energy, n = 0.0, 0.0, 0
    for x in xs:
        v = x.double().reshape(-1)
        step = amax / qmax
        q = torch.clamp(torch.round(v / step), -qmax if signed else 0, qmax) * step
        sse += float((q - v).square().sum())
        energy += float(v.square().sum())
        n += v.numel()
    return sse / n, 10 * math.log10(energy / sse)


def test_mse_and_sqnr_match_a_float64_recomputation(cnn_paths):
    loaded = load_model(cnn_paths["model"], arch=cnn_paths["arch"])
    calib, held, data, plan, held_plan = sources(cnn_paths)
    report = compare(loaded, calib, held, CalibrationConfig(methods=("octav", "sweep", "max")), [4, 6])
    seen = {"calib": {}, "held": {}}
    for split, idx in (("calib", plan), ("held", held_plan)):
        handles = [
            m.register_forward_pre_hook(lambda mod, a, n=n, s=split: seen[s].setdefault(n, []).append(a[0]))
            for n, m in loaded.module.named_modules()
            if n in ("conv2", "fc2")
        ]
        with torch.no_grad():
            for i in idx:
                loaded.module(**data.batch(i).kwargs)
        for h in handles:
            h.remove()
    for name in ("conv2", "fc2"):
        rep = report.targets[f"{name}:input"]
        for row in rep.rows:
            qmax = 2**row.bits - 1  # ReLU outputs: unsigned grid
            mse, sqnr = float64_mse_and_sqnr(seen["calib"][name], row.amax[0], qmax, signed=False)
            assert row.mse == pytest.approx(mse, rel=1e-9)
            assert octavcal.metrics.sqnr_db(row.calib) == pytest.approx(sqnr, rel=1e-9)
            held_mse, _ = float64_mse_and_sqnr(seen["held"][name], row.amax[0], qmax, signed=False)
            assert row.heldout_mse == pytest.approx(held_mse, rel=1e-9)
        best = min(r.mse for r in rep.rows if r.bits == 4)
        assert all(rep.relative_mse(r) >= 1.0 for r in rep.rows) and any(r.mse == best for r in rep.rows)


def test_planted_outliers_are_flagged_as_appendix_g():
    """A bulk of small values plus a few huge outliers: the sweep's minimum is at the outliers, OCTAV's at
    the bulk (see test_methods for the arithmetic), and the report must say so."""
    model = nn.Sequential(nn.Linear(1000, 4)).eval()
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        x = torch.randn(100, 1000, generator=gen)
        x[0, :3] = 350.0
        batches.append(Batch((x,)))
    loaded = LoadedModel(model, "module", None)
    report = compare(loaded, lambda: iter(batches), None, CalibrationConfig(methods=("octav", "sweep")), [4])
    findings = [f for f in comparison_summary(report).appendix_g if f.target == "0:input"]
    assert len(findings) == 1
    f = findings[0]
    assert f.sweep_amax is not None and f.octav_amax is not None and f.ratio is not None
    assert f.sweep_amax > 300 and 3 < f.octav_amax < 10 and f.ratio > 2
    assert f.sweep_small_zeroed_fraction is not None
    assert f.sweep_small_zeroed_fraction > 0.99  # the sweep's choice rounds the bulk to zero
    assert f.nonconvex_batches == [0, 1, 2] and f.disagreeing_batches == [0, 1, 2]
    assert f.sweep_mse is not None and f.octav_mse is not None
    assert f.sweep_mse < f.octav_mse  # the sweep is right about MSE; OCTAV keeps the bulk
    assert set(f.per_batch_amax) == {"octav", "sweep"} and len(f.per_batch_amax["sweep"]) == 3
    assert report.targets["0:input"].findings == [f]


def _planted_report(methods):
    model = nn.Sequential(nn.Linear(1000, 4)).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(100, 1000, generator=gen)
    x[0, :3] = 350.0
    loaded = LoadedModel(model, "module", None)
    return compare(loaded, lambda: iter([Batch((x,))]), None, CalibrationConfig(methods=methods), [4, 8])


GENERIC_KEYS = ["method", "bits", "mean_relative_mse", "worst_relative_mse", "wins"]
TIME_KEYS = ["seconds_per_weight", "seconds_per_activation", "total_seconds"]
FINDING_KEYS = [
    "target",
    "bits",
    "minima_per_batch",
    "nonconvex_batches",
    "disagreeing_batches",
    "octav_amax",
    "sweep_amax",
    "octav_mse",
    "sweep_mse",
    "ratio",
    "sweep_small_zeroed_fraction",
    "per_batch_amax",
]


@pytest.mark.parametrize("methods", [("octav", "sweep"), ("sweep", "max")])
def test_summary_json_keeps_its_keys(methods):
    """report.json's "summary" and `compare --json`: the keys users' scripts read, in their order."""
    report = _planted_report(methods)
    summary = comparison_summary(report)
    doc = summarize(report)
    assert json.loads(json.dumps(doc)) == doc  # plain JSON types only
    assert list(doc) == ["methods", "appendix_f", "appendix_g"]
    assert list(doc["methods"]) == [f"{m}@{b}" for b in (4, 8) for m in methods]
    for key, m in zip(doc["methods"], summary.methods, strict=True):
        assert key == m.key
        assert list(doc["methods"][key]) == [
            *GENERIC_KEYS,
            *TIME_KEYS,
            "weight_tensors",
            "activation_tensors",
        ]
        assert doc["methods"][key]["wins"] == m.wins and doc["methods"][key]["bits"] == m.bits
    assert list(doc["appendix_f"]) == list(methods)
    speedup = ["octav_speedup"] if "octav" in methods else []  # no OCTAV: no speedup key
    assert all(list(v) == [*TIME_KEYS, *speedup] for v in doc["appendix_f"].values())
    if "octav" in methods:
        assert doc["appendix_f"]["octav"]["octav_speedup"] == pytest.approx(1.0)
    else:
        assert all(row.octav_speedup is None for row in summary.appendix_f)
    assert len(summary.appendix_g) == (1 if "octav" in methods else 0)  # the planted 4-bit case
    assert [list(g) for g in doc["appendix_g"]] == [FINDING_KEYS] * len(summary.appendix_g)
    assert [g["target"] for g in doc["appendix_g"]] == [g.target for g in summary.appendix_g]


def test_significant_minima():
    assert significant_minima(torch.tensor([5.0, 3.0, 4.0, 2.0, 6.0])) == [1, 3]
    assert significant_minima(torch.tensor([5.0, 3.0, 3.05, 2.0, 6.0])) == [3]
    assert significant_minima(torch.tensor([3.0, 2.0, 1.0])) == [2]


class _Checker(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.images, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def test_report_files_are_complete_and_self_contained(tmp_path, transformer_paths):
    loaded = load_model(transformer_paths["model"], arch=transformer_paths["arch"])
    calib, held, *_ = sources(transformer_paths, count=2, held=1)
    report = compare(
        loaded, calib, held, CalibrationConfig(methods=("octav", "p99.99")), [4], curve_points=40
    )
    paths = write_report(report, tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert doc["summary"]["appendix_f"]["octav"]["seconds_per_activation"] > 0
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36 * 2 and {r["method"] for r in rows} == {"octav", "p99.99"}
    checker = _Checker()
    checker.feed(paths["html"].read_text())
    assert not checker.errors and not checker.stack
    assert checker.images and all(src.startswith("data:image/png;base64,") for src in checker.images)
    assert "http" not in paths["html"].read_text()  # nothing to fetch: opens offline


def test_report_html_opens_in_headless_chromium(tmp_path, transformer_paths):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (README: the documented browser check)")
    loaded = load_model(transformer_paths["model"], arch=transformer_paths["arch"])
    calib, held, *_ = sources(transformer_paths, count=2, held=1)
    paths = write_report(compare(loaded, calib, held, CalibrationConfig(methods=("octav",)), [4]), tmp_path)
    out = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'p'}",
            "--dump-dom",
            paths["html"].as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "octavcal comparison" in out.stdout and "<img" in out.stdout


def test_compare_from_a_scale_file_uses_each_targets_bits(cnn_paths):
    loaded = load_model(cnn_paths["model"], arch=cnn_paths["arch"])
    calib, _, data, plan, _ = sources(cnn_paths)
    batches = [data.batch(i) for i in plan]
    table = octavcal.calibrate(
        loaded, batches, CalibrationConfig(bits=4, methods=("octav",), first_last_bits=8)
    )
    report = compare(loaded, calib, None, CalibrationConfig(methods=("octav",)), [4], tables={4: table})
    row = report.targets["conv1:input"].rows[0]
    assert row.target_bits == 8 and row.heldout_mse is None  # no held-out data: no held-out numbers
    x = torch.cat([b.kwargs["x"] for b in batches])
    mse, _ = float64_mse_and_sqnr([x], row.amax[0], 255, signed=False)  # conv1's input at 8 bits, unsigned
    assert row.mse == pytest.approx(mse, rel=1e-9)
