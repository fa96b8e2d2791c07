"""The quality benchmark's bookkeeping: rows from run results, and the combined markdown table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: what a CBQ report says of its windows: LoRA-rounding factors and clipping trained, windows overlapping
CBQ_WINDOWS = {"window": {"size": 2, "overlap": 1}, "windows": [
    {"index": 0, "trainable_parameters": {"rounding": 80, "rounding_offset": 0, "weight_clip": 20,
                                          "activation_clip": 0, "correction": 0}}]}


def _run(ppl: float, wall: float = 600.0) -> dict:
    return {"report": {"eval": [{"dataset": "wikitext2", "ppl": ppl}], "calibration_time_s": wall / 2,
                       "peak_rss_gib": 2.5, **CBQ_WINDOWS}, "wall_s": wall}


def _tables(text: str) -> list[list[dict[str, str]]]:
    """Every markdown table in ``text`` as rows of ``{column header: cell}``: the tests read cells by column,
    not the table's layout (a column added or moved is not a regression); a row whose cell count differs from
    its header's is one."""
    tables, header, rows = [], None, []
    for line in [*text.splitlines(), ""]:
        if not line.startswith("|"):
            if header is not None:
                tables.append(rows)
            header, rows = None, []
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif set(line) - set("|-: "):  # not the separator row
            assert len(cells) == len(header), line
            rows.append(dict(zip(header, cells, strict=True)))
    return tables


def _row(text: str, scheme: str, table: int = 0, **match: str) -> dict[str, str]:
    """The row of ``scheme`` in the ``table``-th table of ``text`` (and whose other cells equal ``match``)."""
    found = [r for r in _tables(text)[table] if r["scheme"] == scheme and all(r[k] == v for k, v in match.items())]
    assert len(found) == 1, (scheme, match, text)
    return found[0]


def test_only_a_lora_rounding_run_on_overlapping_windows_is_called_cbq(quality) -> None:
    assert quality.is_cbq(CBQ_WINDOWS)
    counts = CBQ_WINDOWS["windows"][0]["trainable_parameters"]
    offsets = {**CBQ_WINDOWS, "windows": [{"trainable_parameters": {**counts, "rounding": 0, "rounding_offset": 99}}]}
    assert not quality.is_cbq(offsets)
    assert not quality.is_cbq({**CBQ_WINDOWS, "window": {"size": 2, "overlap": 0}})
    assert not quality.is_cbq({"window": {"size": 2, "overlap": 1}, "windows": [{"index": 0}]})  # no counts: unknown
    fp = {"results": [{"ppl": 20.0}]}
    old = quality._row("W3A16G64", fp, _run(72.0), {"report": {**_run(27.84)["report"], **offsets}, "wall_s": 1.0})
    assert _row(quality._table([old]), "W3A16G64")["CBQ (shipped recipe)"] == "not CBQ: 27.84 (earlier recipe)"


def test_row_gap_closed_and_cfp_ablation(quality) -> None:
    fp = {"results": [{"ppl": 20.0}]}
    row = quality._row("W4A4", fp, _run(220.0), _run(70.0), _run(120.0))
    assert row["gap_closed"] == pytest.approx((220 - 70) / (220 - 20))
    assert row["cbq_no_cfp"] == 120.0 and row["cbq_over_rtn"] == pytest.approx(70 / 220)
    assert row["cbq_over_fp"] == pytest.approx(3.5)
    assert quality._row("W4A16", fp, _run(30.0), _run(25.0))["cbq_no_cfp"] is None


def test_paper_settings_have_a_column_of_their_own(quality) -> None:
    fp = {"results": [{"ppl": 20.0}]}
    row = quality._row("W3A16G64", fp, _run(72.0), _run(28.0), cbq_paper=_run(60.0, wall=900.0))
    assert row["cbq_paper"] == 60.0 and row["cbq_paper_time_s"] == 900.0 and row["cbq"] == 28.0
    cells = _row(quality._table([row]), "W3A16G64")
    assert (cells["CBQ (paper settings)"], cells["CBQ w/o CFP"], cells["CBQ (shipped recipe)"]) == ("60.00", "-", "28.00")


def test_paper_flags_are_what_method_md_states(quality) -> None:
    """The paper row's overrides, read from configs/paper/: RTN start, LoRA-Rounding (residual, rank 4, soft
    forward, no per-column scale: the shipped recipes' extension is switched off), K=2/O=1, both branches with the
    hidden-state KL, no output KL, no keep-best, the paper's learning rates, no rotation; the same for every scheme."""
    settings = quality.paper_settings()
    assert settings["extensions.gptq"] == "null" and settings["rounding.form"] == "residual"
    assert settings["rounding.rank"] == "4" and float(settings["extensions.column_scale"]) == 0
    assert settings["extensions.rounding_forward"] == "soft" and (settings["window.size"], settings["window.overlap"]) == ("2", "1")
    assert float(settings["loss.kl_weight"]) == 1.0 and float(settings["extensions.output_kl_weight"]) == 0
    assert (float(settings["train.lr_rounding"]), float(settings["train.lr_clip"])) == (0.001, 0.005)
    assert settings["extensions.rotation"] == "null" and settings["extensions.end_to_end"] == "null"
    for scheme in quality.DEFAULT_SCHEMES:
        flags = quality.paper_flags(scheme)
        assert quality.paper_settings(scheme) == settings
        assert flags[flags.index("--cfp.truncation") + 1] == "judged" and len(flags) == 2 * len(quality.PAPER_KEYS)


@pytest.mark.parametrize("scheme", ["W4A16", "W3A16G64", "W2A16G64", "W4A8", "W4A4"])
def test_the_rtn_cell_is_plain_round_to_nearest_on_every_recipe(quality, scheme: str) -> None:
    """The RTN baseline's command on each scheme's recipe passes the checks a run makes first (``method: rtn``
    refuses an end-to-end phase) and is plain round-to-nearest: no GPTQ start, rotation, phase or CFP."""
    from cbq_lightning.config import validate
    from tests.conftest import load_recipe

    config = load_recipe(REPO / "configs" / f"smollm2_{scheme.lower()}.yaml", "--method", "rtn", *quality.PLAIN_RTN,
                         *quality.CFP_OFF)
    config.model.name_or_path = "tiny-llama"  # the checks, not the GGUF (an optional extra, absent in CI)
    validate(config)
    assert (config.extensions.gptq, config.extensions.rotation, config.extensions.end_to_end) == (None, None, None)
    assert not (config.cfp.weights or config.cfp.activations)


def test_recipe_deviations_are_read_from_the_recipe(quality, tmp_path: Path) -> None:
    """A recipe that sets the paper's values has no deviation; changing two keys lists exactly those two
    (a key the recipe leaves out is compared at the code's default)."""
    tree: dict = {}
    for key, value in quality.paper_settings().items():  # dotted keys, one to three levels deep
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value

    def as_yaml(node: dict, indent: str = "") -> str:  # the values are YAML text already (``null``, ``{}``, ``1``)
        return "".join(f"{indent}{name}:\n{as_yaml(value, indent + '  ')}" if isinstance(value, dict)
                       else f"{indent}{name}: {value}\n" for name, value in node.items())

    text = "model:\n  name_or_path: tiny-llama\n" + as_yaml(tree)
    assert "advanced:\n  quant:\n    clip_init: 0.99\n" in text
    recipe = tmp_path / "paper.yaml"
    recipe.write_text(text)
    assert quality.recipe_deviations(recipe) == {}
    recipe.write_text(text.replace("overlap: 1", "overlap: 0").replace("forward: soft", "forward: hardened"))
    assert quality.recipe_deviations(recipe) == {"window.overlap": ("1", "0"), "extensions.rounding_forward": ("soft", "hardened")}
    # an extension section is a deviation too
    recipe.write_text(text.replace("  rotation: null", "  rotation:\n    online_down: false"))
    assert quality.recipe_deviations(recipe) == {"extensions.rotation": ("null", "{online_down: false}")}


def test_schemes_with_activations_get_the_ablation(quality) -> None:
    assert quality._quantizes_activations("W4A4") and quality._quantizes_activations("W4A8")
    assert not quality._quantizes_activations("W3A16G64")


def test_combined_table_takes_the_latest_record_of_every_scheme(quality, tmp_path: Path) -> None:
    fp = {"results": [{"ppl": 20.0}]}
    rows = {"W4A16": quality._row("W4A16", fp, _run(37.0), _run(28.0)),
            "W4A4": quality._row("W4A4", fp, _run(900.0), _run(300.0), _run(450.0))}
    for scheme, row in rows.items():
        record = {"row": row, "invocation": f"python benchmarks/quality.py --schemes {scheme}", "git_commit": "abc",
                  "device": "cpu", "date": "2026-11-22", "versions": {"torch": "2", "transformers": "5", "lightning": "2"},
                  "cbq_report": CBQ_WINDOWS}
        (tmp_path / f"quality_{scheme.lower()}.json").write_text(json.dumps(record))
    table = quality._combined_table(tmp_path, "")
    assert [r["scheme"] for r in _tables(table)[0]] == ["W4A16", "W4A4"]  # the schemes' order, not the files'
    w4 = _row(table, "W4A16")
    assert (w4["FP"], w4["RTN"], w4["CBQ (paper settings)"], w4["CBQ w/o CFP"]) == ("20.00", "37.00", "not measured", "-")
    assert (w4["CBQ (shipped recipe)"], w4["gap closed"]) == ("28.00", "53 %")
    w4a4 = _row(table, "W4A4")
    assert (w4a4["RTN"], w4a4["CBQ w/o CFP"], w4a4["CBQ (shipped recipe)"]) == ("900.00", "450.00", "300.00")
    assert (w4a4["gap closed"], w4a4["CBQ / RTN"], w4a4["CBQ / FP"]) == ("68 %", "0.33", "15.00")
    assert "--schemes W4A4" in table


# --- peers (GPTQ, AutoRound) and the plot -----------------------------------------------------------------


def _peer_record(name: str, ppl: float | None, status: str = "ok", reason: str | None = None) -> dict:
    return {"peer": name, "package": {"gptq": "gptqmodel", "autoround": "auto-round"}[name], "version": "1.0",
            "status": status, "reason": reason, "settings": {"bits": 3, "group_size": 64, "sym": False},
            "results": [{"dataset": "wikitext2", "ppl": ppl}] if ppl is not None else [], "quantize_s": 90.0,
            "process_wall_s": 150.0, "peak_rss_gib": 1.5, "command": f"python -m benchmarks.peers --peer {name}"}


def test_peer_columns_show_perplexity_or_the_reason(quality) -> None:
    fp = {"results": [{"ppl": 20.0}]}
    peers = {"gptq": _peer_record("gptq", 45.0),
             "autoround": _peer_record("autoround", None, "unavailable", "auto-round not installed (pip install -e '.[peers]')")}
    row = quality._row("W3A16G64", fp, _run(72.0), _run(36.0), peers=peers)
    assert row["peers"]["gptq"]["ppl"] == 45.0 and row["peers"]["autoround"]["status"] == "unavailable"
    w4a4 = quality._row("W4A4", fp, _run(900.0), _run(300.0), _run(450.0),
                        peers={"gptq": _peer_record("gptq", None, "failed", "RuntimeError: boom")})
    old = quality._row("W4A16", fp, _run(37.0), _run(28.0))  # a record made before peers existed
    table = quality._table([row, w4a4, old])
    w3 = _row(table, "W3A16G64")
    assert w3["GPTQ"] == "45.00" and w3["AutoRound (200 iters)"].startswith("not run: auto-round not installed")
    assert w3["CBQ (shipped recipe)"] == "36.00"
    failed = _row(table, "W4A4")
    assert (failed["GPTQ"], failed["AutoRound (200 iters)"], failed["CBQ w/o CFP"]) == ("failed: RuntimeError: boom", "-", "450.00")
    before = _row(table, "W4A16")  # a record made before peers existed: "-" under every peer
    assert (before["GPTQ"], before["AutoRound (200 iters)"], before["CBQ (shipped recipe)"]) == ("-", "-", "28.00")
    notes = quality._peer_notes(row)
    assert len(notes) == 1 and "GPTQ: gptqmodel 1.0 (bits 3, group_size 64, sym False)" in notes[0]
    assert "quantization 1.5 min, whole peer run 2.5 min" in notes[0]
    # no peers anywhere: the table keeps its columns
    assert "GPTQ" not in _row(quality._table([old]), "W4A16") and "CBQ (paper settings)" in _row(quality._table([old]), "W4A16")


def test_peer_process_gives_a_record_in_any_environment(quality, tmp_path: Path, monkeypatch) -> None:
    """The real subprocess on the tiny recipe: GPTQ runs where gptqmodel is installed, says why not elsewhere."""
    flags = ["--data.num_samples", "4", "--data.seqlen", "32", "--eval.seqlen", "32", "--eval.max_windows", "2"]
    record = quality._peer(REPO / "configs" / "tiny.yaml", "gptq", tmp_path, flags)
    if importlib.util.find_spec("gptqmodel") is None:
        assert record["status"] == "unavailable" and "gptqmodel not installed" in record["reason"]
    else:
        assert record["status"] == "ok", record["reason"]
        assert record["results"][0]["windows"] == 2 and record["settings"]["samples"] == 4
    assert record["process_wall_s"] > 0 and "--peer gptq" in record["command"]
    # a process that dies without writing its record is still a row
    monkeypatch.setattr(quality.sys, "executable", "false")
    broken = quality._peer(REPO / "configs" / "tiny.yaml", "gptq", tmp_path / "x", flags)
    assert broken["status"] == "failed" and broken["reason"].startswith("peer process exited with status")


def _record(scheme: str, fp: float, rtn: float, cbq: float, peers: dict | None = None, blocks: int = 4,
            rtn_errors: bool = True) -> dict:
    row = {"scheme": scheme, "fp": fp, "rtn": rtn, "cbq": cbq, "cbq_no_cfp": None,
           "gap_closed": (rtn - cbq) / (rtn - fp), "cbq_over_rtn": cbq / rtn, "cbq_time_s": 600.0,
           "cbq_peak_rss_gib": 2.5, "eval": {"dataset": "wikitext2", "windows": 40, "seqlen": 2048}}
    if peers:
        row["peers"] = peers
    errors = [{"block": b, "quantized": 0.01 * (b + 1), "rtn": None} for b in range(blocks)]
    return {"row": row, "invocation": f"python benchmarks/quality.py --schemes {scheme}", "git_commit": "abc",
            "device": "cpu", "date": "2026-11-23", "recipe": f"configs/smollm2_{scheme.lower()}.yaml", "overrides": [],
            "versions": {"torch": "2", "transformers": "5", "lightning": "2"},
            "cbq_report": {"block_errors": errors, "model": {"name_or_path": "tiny-llama"}, **CBQ_WINDOWS},
            **({"rtn_block_errors": [{"block": b, "quantized": 0.03 * (b + 1), "rtn": None} for b in range(blocks)]}
               if rtn_errors else {})}


def test_plot_from_synthetic_records(quality, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = quality._plot_module()
    ok = {"status": "ok", "ppl": 40.0, "reason": None}
    records = [
        _record("W4A16", 20.0, 37.0, 28.0, {"gptq": ok | {"ppl": 30.0}, "autoround": ok | {"ppl": 29.0}}),
        _record("W3A16G64", 20.0, 72.0, 36.0, {"gptq": ok, "autoround": {"status": "unavailable", "ppl": None,
                                                                          "reason": "not installed"}}),
        _record("W2A16G64", 20.0, 8.6e5, 598.0, rtn_errors=False),  # old record: CBQ's block errors only
        _record("W4A4", 20.0, 11561.0, 2419.0),  # activation scheme: not on the bits axis
    ]
    records[0]["recipe_deviations"] = {"rotation": ["null", "{}"], "end_to_end": ["null", "{epochs: 4}"],
                                       "train.lr_rounding": ["0.001", "0.005"]}
    assert plot.extensions(records[0]) == ["rotation", "end-to-end phase"]  # a learning rate is not an extension
    assert plot.extensions(records[1]) == []
    records[1]["recipe_deviations"] = {"extensions.end_to_end": ["null", "{epochs: 4, norms: true}"]}
    assert plot.extensions(records[1]) == ["end-to-end phase with norms"]  # a lever inside the extension, named too
    cbq, rtn = plot.block_errors(records[0])
    assert cbq[0] == (0, 0.01) and rtn[-1] == (3, pytest.approx(0.12))
    assert plot.block_errors(records[2])[1] == []
    path = plot.plot_quality(records, tmp_path / "quality.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no weight-only scheme"):
        plot.plot_quality([records[3]], tmp_path / "none.png")


def test_the_script_runs_as_documented_from_anywhere(tmp_path: Path) -> None:
    """``python benchmarks/quality.py ...`` as the docs write it: a fresh process, no PYTHONPATH, another working
    folder (it imports benchmarks.peers, which lives under the repository root, not beside the script)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    records = tmp_path / "records"
    records.mkdir()
    (records / "quality_w3a16g64.json").write_text(json.dumps(_record("W3A16G64", 20.0, 72.0, 36.0)))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "quality.py"), "--redraw", "--output",
                           str(records)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _row((records / "quality.md").read_text(), "W3A16G64")["RTN"] == "72.00"  # the table imports the peers


def test_redraw_rewrites_table_and_plot_from_the_records(quality, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for scheme, values in {"W4A16": (20.0, 37.0, 28.0), "W3A16G64": (20.0, 72.0, 36.0)}.items():
        (tmp_path / f"quality_{scheme.lower()}.json").write_text(json.dumps(_record(scheme, *values)))
    assert quality.main(["--redraw", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is None:
        assert "plot skipped: matplotlib is not installed" in out
    else:
        assert (tmp_path / "quality.png").stat().st_size > 10_000
    table = (tmp_path / "quality.md").read_text()
    assert _row(table, "W4A16")["RTN"] == "37.00" and _row(table, "W3A16G64")["RTN"] == "72.00"
    assert quality.main(["--redraw", "--output", str(tmp_path / "empty")]) == 0
    out = capsys.readouterr().out
    assert "table skipped" in out and "plot skipped" in out
    assert not (tmp_path / "empty" / "quality.md").exists()


def test_peers_only_adds_peers_to_the_existing_record(quality, tmp_path: Path, monkeypatch) -> None:
    record = _record("W3A16G64", 20.0, 72.0, 36.0)
    record["overrides"] = ["train.epochs=2"]
    path = tmp_path / "quality_w3a16g64.json"
    path.write_text(json.dumps(record))
    calls = []

    def fake_peer(recipe, name, workdir, flags):
        calls.append((recipe.name, name, flags))
        return _peer_record(name, 41.0 if name == "gptq" else 39.0)

    monkeypatch.setattr(quality, "_peer", fake_peer)
    monkeypatch.setattr(quality, "_draw", lambda folder, suffix: None)
    assert quality.main(["--schemes", "W3A16G64", "--peers", "gptq,autoround", "--peers-only",
                         "--output", str(tmp_path)]) == 0
    assert calls == [("smollm2_w3a16g64.yaml", "gptq", ["--train.epochs", "2"]),
                     ("smollm2_w3a16g64.yaml", "autoround", ["--train.epochs", "2"])]
    updated = json.loads(path.read_text())
    assert updated["row"]["cbq"] == 36.0 and updated["row"]["peers"]["autoround"]["ppl"] == 39.0
    assert set(updated["peers"]) == {"gptq", "autoround"} and "--peers-only" in updated["peer_run"]["invocation"]
    table = (tmp_path / "quality.md").read_text()
    cells = _row(table, "W3A16G64")
    assert (cells["GPTQ"], cells["AutoRound (200 iters)"], cells["CBQ (shipped recipe)"]) == ("41.00", "39.00", "36.00")
    with pytest.raises(SystemExit, match="drop --set"):
        quality.main(["--schemes", "W3A16G64", "--peers", "gptq", "--peers-only", "--set", "train.epochs=3",
                      "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="no record"):
        quality.main(["--schemes", "W4A16", "--peers", "gptq", "--peers-only", "--output", str(tmp_path)])


def test_peer_records_from_another_machine_join_the_scheme_record(quality, tmp_path: Path, monkeypatch) -> None:
    record = _record("W3A16G64", 20.0, 72.0, 36.0)
    record["overrides"] = ["train.epochs=2"]
    path = tmp_path / "quality_w3a16g64.json"
    path.write_text(json.dumps(record))
    monkeypatch.setattr(quality, "_draw", lambda folder, suffix: None)
    peer = {**_peer_record("autoround", 39.5), "recipe": "configs/smollm2_w3a16g64.yaml", "device": "cuda:0",
            "overrides": ["--trainer.accelerator", "gpu", "--train.epochs", "2", "--data_dir", "/data"]}
    peer_file = tmp_path / "ar200.json"
    peer_file.write_text(json.dumps(peer))
    assert quality.main(["--peer-records", str(peer_file), "--output", str(tmp_path)]) == 0
    updated = json.loads(path.read_text())
    assert updated["row"]["peers"]["autoround"]["ppl"] == 39.5 and updated["row"]["cbq"] == 36.0
    assert updated["peer_imports"]["autoround"]["device"] == "cuda:0"
    table = (tmp_path / "quality.md").read_text()
    assert _row(table, "W3A16G64")["AutoRound (200 iters)"] == "39.50" and "on cuda:0" in table
    # a peer run with calibration flags other than the record's is refused
    peer["overrides"] = ["--trainer.accelerator", "gpu", "--train.epochs", "3"]
    peer_file.write_text(json.dumps(peer))
    with pytest.raises(SystemExit, match="must calibrate like the record"):
        quality.main(["--peer-records", str(peer_file), "--output", str(tmp_path)])
    peer["recipe"] = "configs/tiny.yaml"
    peer_file.write_text(json.dumps(peer))
    with pytest.raises(SystemExit, match="not a peer record of a benchmark recipe"):
        quality.main(["--peer-records", str(peer_file), "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="no file"):
        quality.main(["--peer-records", str(tmp_path / "missing.json"), "--output", str(tmp_path)])


# --- ablations (extra CBQ runs with overrides) -----------------------------------------------------------------


def test_ablation_specs_are_checked(quality) -> None:
    assert quality._parse_ablations([["lowrank10", "extensions.correction.rank_fraction=0.1", "extensions.lr_correction=1e-3"]]) == {
        "lowrank10": ["extensions.correction.rank_fraction=0.1", "extensions.lr_correction=1e-3"]}
    with pytest.raises(SystemExit, match="write a name"):
        quality._parse_ablations([["extensions.correction.rank=4"]])
    with pytest.raises(SystemExit, match="write a name"):
        quality._parse_ablations([["lowrank"]])
    with pytest.raises(SystemExit, match="twice"):
        quality._parse_ablations([["a", "x.y=1"], ["a", "x.y=2"]])
    with pytest.raises(SystemExit, match="key=value"):
        quality._parse_ablations([["a", "x.y"]])


def _recording_quantize(calls: list, make_run):
    """A stand-in for ``quality._quantize`` that records its calls and returns ``make_run(flags, name)``."""

    def fake_quantize(recipe, method, workdir, flags, cfp=True, name=""):
        calls.append((recipe.name, method, flags, name))
        run = make_run(flags, name)
        run["report"]["device"] = "cpu"
        run["command"] = f"cbq quantize {' '.join(flags)}"
        return run

    return fake_quantize


def test_ablations_only_adds_rows_to_the_existing_record(quality, tmp_path: Path, monkeypatch) -> None:
    record = _record("W4A4", 20.0, 11000.0, 2400.0)
    record["overrides"] = ["train.epochs=2"]
    # an ablation run before a recipe change: its overrides were applied to other settings than today's
    record["row"]["ablations"] = {"old": {"name": "old", "overrides": ["x.y=1"], "ppl": 900.0, "over_cbq": 0.4,
                                          "time_s": 60.0, "peak_rss_gib": 2.0, "settings": "0123456789abcdef"}}
    path = tmp_path / "quality_w4a4.json"
    path.write_text(json.dumps(record))
    calls = []

    def ablation_run(flags: list[str], name: str) -> dict:
        run = _run(1200.0 if "extensions.correction.rank_fraction" in " ".join(flags) else 2000.0, wall=1500.0)
        if name == "ablation_lowrank10":
            run["report"]["correction"] = {"parameters": 1_000_000, "parameters_per_quantized_weight": 0.125}
        return run

    monkeypatch.setattr(quality, "_quantize", _recording_quantize(calls, ablation_run))
    monkeypatch.setattr(quality, "_draw", lambda folder, suffix: None)
    assert quality.main(["--schemes", "W4A4", "--ablations-only", "--output", str(tmp_path),
                         "--ablation", "lowrank10", "extensions.correction.rank_fraction=0.1",
                         "--ablation", "smooth", "extensions.continuous.clamp=smooth"]) == 0
    assert calls == [
        ("smollm2_w4a4.yaml", "cbq", ["--train.epochs", "2", "--extensions.correction.rank_fraction", "0.1"], "ablation_lowrank10"),
        ("smollm2_w4a4.yaml", "cbq", ["--train.epochs", "2", "--extensions.continuous.clamp", "smooth"], "ablation_smooth"),
    ]
    updated = json.loads(path.read_text())
    assert updated["row"]["cbq"] == 2400.0, "the plain CBQ row stays"
    assert updated["row"]["ablations"]["lowrank10"]["over_cbq"] == pytest.approx(0.5)
    table = (tmp_path / "quality.md").read_text()
    lowrank = _row(table, "W4A4", table=1, ablation="lowrank10")
    assert (lowrank["overrides"], lowrank["PPL"], lowrank["/ CBQ"]) == ("`extensions.correction.rank_fraction=0.1`", "1200.00", "0.500")
    assert (lowrank["adds"], lowrank["time"], lowrank["peak RSS"]) == ("1,000,000 params (12.5 %)", "25.0 min", "2.50 GiB")
    smooth = _row(table, "W4A4", table=1, ablation="smooth")
    assert (smooth["PPL"], smooth["/ CBQ"], smooth["adds"]) == ("2000.00", "0.833", "-")
    assert _row(table, "W4A4", table=1, ablation="old (earlier recipe)")["PPL"] == "900.00"
    ran = ["--train.epochs", "2", "--extensions.continuous.clamp", "smooth"]
    assert updated["row"]["ablations"]["smooth"]["settings"] == quality._fingerprint(
        quality.recipe_settings(quality.ROOT / "configs/smollm2_w4a4.yaml", ran)[0])
    with pytest.raises(SystemExit, match="needs --ablation"):
        quality.main(["--schemes", "W4A4", "--ablations-only", "--output", str(tmp_path)])


def test_paper_only_adds_the_paper_row_to_the_existing_record(quality, tmp_path: Path, monkeypatch) -> None:
    record = _record("W3A16G64", 20.0, 72.0, 28.0)
    record["overrides"] = ["train.epochs=2"]
    path = tmp_path / "quality_w3a16g64.json"
    path.write_text(json.dumps(record))
    calls = []
    monkeypatch.setattr(quality, "_quantize", _recording_quantize(calls, lambda flags, name: _run(60.0, wall=1200.0)))
    monkeypatch.setattr(quality, "_draw", lambda folder, suffix: None)
    assert quality.main(["--schemes", "W3A16G64", "--paper-only", "--output", str(tmp_path)]) == 0
    assert calls == [("smollm2_w3a16g64.yaml", "cbq", ["--train.epochs", "2", *quality.paper_flags("W3A16G64")], "cbq_paper")]
    updated = json.loads(path.read_text())
    assert updated["row"]["cbq_paper"] == 60.0 and updated["row"]["cbq"] == 28.0
    assert "--paper-only" in updated["paper_run"]["invocation"]
    cells = _row((tmp_path / "quality.md").read_text(), "W3A16G64")
    assert (cells["RTN"], cells["CBQ (paper settings)"], cells["CBQ (shipped recipe)"]) == ("72.00", "60.00", "28.00")
    with pytest.raises(SystemExit, match="one after the other"):
        quality.main(["--schemes", "W3A16G64", "--paper-only", "--ablations-only", "--ablation", "a", "x.y=1",
                      "--output", str(tmp_path)])


def test_cbq_only_replaces_the_shipped_column_and_keeps_the_rest(quality, tmp_path: Path, monkeypatch) -> None:
    """``--cbq-only`` after a recipe change: CBQ (and CBQ w/o CFP for an activation scheme, with CFP off) runs
    again with the record's overrides; its cells and the ratios against the record's FP and RTN are replaced
    (gap closed: (38 - 24) / (38 - 20) = 77.8 %), while the peers and the paper row stay."""
    ok = {"status": "ok", "ppl": 30.0, "reason": None, "package": "gptqmodel", "version": "7.6.0",
          "settings": {"bits": 4}, "quantize_s": 60.0, "wall_s": 120.0, "peak_rss_gib": 2.0}
    record = _record("W4A8", 20.0, 38.0, 26.0, {"gptq": ok})
    record["overrides"] = ["train.epochs=2"]
    record["row"]["cbq_paper"] = 32.0
    path = tmp_path / "quality_w4a8.json"
    path.write_text(json.dumps(record))
    calls = []
    monkeypatch.setattr(quality, "_quantize", _recording_quantize(
        calls, lambda flags, name: _run(25.0 if name == "cbq_no_cfp" else 24.0, wall=1800.0)))
    monkeypatch.setattr(quality, "_draw", lambda folder, suffix: None)
    assert quality.main(["--schemes", "W4A8", "--cbq-only", "--output", str(tmp_path)]) == 0
    assert calls == [("smollm2_w4a8.yaml", "cbq", ["--train.epochs", "2"], ""),  # the shipped figure first
                     ("smollm2_w4a8.yaml", "cbq", ["--train.epochs", "2"], "cbq_no_cfp")]
    updated = json.loads(path.read_text())
    row = updated["row"]
    assert (row["cbq"], row["cbq_no_cfp"], row["cbq_paper"], row["fp"], row["rtn"]) == (24.0, 25.0, 32.0, 20.0, 38.0)
    assert row["gap_closed"] == pytest.approx(14 / 18) and row["cbq_over_rtn"] == pytest.approx(24 / 38)
    assert row["peers"]["gptq"]["ppl"] == 30.0
    assert "--cbq-only" in updated["cbq_run"]["invocation"]
    cells = _row((tmp_path / "quality.md").read_text(), "W4A8")
    assert (cells["CBQ (shipped recipe)"], cells["CBQ w/o CFP"], cells["gap closed"], cells["CBQ time"]) == (
        "24.00", "25.00", "78 %", "30.0 min")
    assert "CBQ (shipped recipe) re-run by `python benchmarks/quality.py --schemes W4A8 --cbq-only" in (
        tmp_path / "quality.md").read_text()


# --- runs made elsewhere, and seeds (--cbq-runs) ---------------------------------------------------------------


def _quantize_output(quality, folder: Path, scheme: str, ppl: float, *flags: str, seed: int = 0,
                     windows: int = 40) -> Path:
    """A finished ``cbq quantize`` output of the scheme's recipe: the config.yaml ``cbq quantize`` writes (the
    recipe resolved with ``flags``, run elsewhere: another output and data folder, no progress bar, no FP
    reference) and a report with the perplexity."""
    import dataclasses

    import yaml

    from tests.conftest import load_recipe

    recipe = REPO / "configs" / f"smollm2_{scheme.lower()}.yaml"
    placement = ["--output_dir", str(folder), "--data_dir", "/elsewhere", "--advanced.trainer.enable_progress_bar", "false",
                 "--eval.fp_reference", "false", "--seed", str(seed)]
    config = load_recipe(recipe, *placement, *flags)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(config), default=str))))
    report = {**_run(ppl, wall=1500.0)["report"], "method": "cbq", "scheme": {"name": scheme}, "wall_time_s": 1500.0,
              "device": "cpu (x86_64, 2 threads)", "versions": {"torch": "2.13.0+cpu", "git": "abc1234"}, "seed": seed}
    report["eval"] = [{"dataset": "wikitext2", "ppl": ppl, "seqlen": 2048, "windows": windows}]
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_cbq_runs_fill_the_cell_and_the_seed_spread(quality, tmp_path: Path, monkeypatch) -> None:
    """Runs of the recipe made outside the benchmark join the record after their config.yaml is checked: the
    recipe's seed (0) replaces the CBQ cell and its time, seeds 0, 1, 2 give the spread (61, 62, 63: mean 62.00,
    sample standard deviation 1.00); a run with other settings, another evaluation, or no report is refused."""
    monkeypatch.setattr(quality, "_draw", lambda folder, suffix: None)
    record = _record("W2A16G64", 20.0, 8.6e5, 67.5)
    path = tmp_path / "quality_w2a16g64.json"
    path.write_text(json.dumps(record))
    runs = [_quantize_output(quality, tmp_path / f"seed{seed}", "W2A16G64", ppl, seed=seed)
            for seed, ppl in ((1, 62.0), (0, 61.0), (2, 63.0))]
    assert quality.main(["--cbq-runs", *map(str, runs), "--output", str(tmp_path)]) == 0
    row = json.loads(path.read_text())["row"]
    assert (row["cbq"], row["cbq_time_s"], row["fp"]) == (61.0, 1500.0, 20.0)
    assert row["cbq_seeds"]["ppl"] == {"0": 61.0, "1": 62.0, "2": 63.0}
    table = (tmp_path / "quality.md").read_text()
    assert _row(table, "W2A16G64")["CBQ (shipped recipe)"] == "61.00 (seeds 0, 1, 2: 62.00 ± 1.00)"
    assert _row(table, "W2A16G64")["CBQ time"] == "25.0 min"
    assert "a `cbq quantize` run (git abc1234, cpu (x86_64, 2 threads), torch 2.13.0+cpu) added by `python " \
        "benchmarks/quality.py --cbq-runs" in table
    # settings other than the recipe's are refused, naming the difference
    other = _quantize_output(quality, tmp_path / "rank7", "W2A16G64", 60.0, "--rounding.rank", "7")
    with pytest.raises(SystemExit, match=r"rounding.rank 7 \(recipe \d+\)"):
        quality.main(["--cbq-runs", str(other), "--output", str(tmp_path)])
    short = _quantize_output(quality, tmp_path / "short", "W2A16G64", 60.0, windows=10)
    with pytest.raises(SystemExit, match="was evaluated on"):
        quality.main(["--cbq-runs", str(short), "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a finished `cbq quantize` output"):
        quality.main(["--cbq-runs", str(tmp_path / "missing"), "--output", str(tmp_path)])
    # a resume (kept windows, another end-to-end phase) times only what ran after them: not for the cell, but a
    # seed of the spread all the same
    resumed = [_quantize_output(quality, tmp_path / f"resumed{seed}", "W2A16G64", 60.0 + seed, seed=seed)
               for seed in (0, 1)]
    for folder in resumed:
        report = json.loads((folder / "report.json").read_text())
        (folder / "report.json").write_text(json.dumps({**report, "resumed_after_window": 29, "wall_time_s": 300.0}))
    with pytest.raises(SystemExit, match=r"resumed after window 29.*import a whole run of that seed"):
        quality.main(["--cbq-runs", str(resumed[0]), "--output", str(tmp_path)])
    assert json.loads(path.read_text())["row"]["cbq"] == 61.0  # nothing refused reached the record
    assert quality.main(["--cbq-runs", str(resumed[1]), "--output", str(tmp_path)]) == 0
    row = json.loads(path.read_text())["row"]
    assert (row["cbq"], row["cbq_time_s"], row["cbq_seeds"]["ppl"]) == (61.0, 1500.0, {"0": 61.0, "1": 61.0, "2": 63.0})
    # a later run with new settings (here: as if the recipe had changed) starts a new spread
    changed = _record("W2A16G64", 20.0, 8.6e5, 61.0)
    changed["overrides"] = ["rounding.rank=96"]
    changed["row"]["cbq_seeds"] = row["cbq_seeds"]
    path.write_text(json.dumps(changed))
    new = _quantize_output(quality, tmp_path / "new0", "W2A16G64", 59.0, "--rounding.rank", "96")
    assert quality.main(["--cbq-runs", str(new), "--output", str(tmp_path)]) == 0
    assert json.loads(path.read_text())["row"]["cbq_seeds"]["ppl"] == {"0": 59.0}
    assert _row((tmp_path / "quality.md").read_text(), "W2A16G64")["CBQ (shipped recipe)"] == "59.00"


def test_cbq_runs_keep_the_no_cfp_cell_only_for_its_own_settings(quality, tmp_path: Path, monkeypatch) -> None:
    """An activation scheme's run with CFP off fills ``CBQ w/o CFP``; a shipped run of the same settings keeps it,
    while an older record's w/o-CFP figure (other settings) is cleared when the shipped cell is replaced."""
    monkeypatch.setattr(quality, "_draw", lambda folder, suffix: None)
    record = _record("W4A8", 20.0, 38.0, 24.2)
    record["row"]["cbq_no_cfp"] = 24.04  # measured with an earlier recipe
    path = tmp_path / "quality_w4a8.json"
    path.write_text(json.dumps(record))
    shipped = _quantize_output(quality, tmp_path / "a", "W4A8", 22.5)
    assert quality.main(["--cbq-runs", str(shipped), "--output", str(tmp_path)]) == 0
    assert json.loads(path.read_text())["row"]["cbq_no_cfp"] is None
    no_cfp = _quantize_output(quality, tmp_path / "b", "W4A8", 22.9, "--cfp.weights", "false",
                              "--cfp.activations", "false")
    assert quality.main(["--cbq-runs", str(no_cfp), str(shipped), "--output", str(tmp_path)]) == 0
    row = json.loads(path.read_text())["row"]
    assert (row["cbq"], row["cbq_no_cfp"]) == (22.5, 22.9)
    assert row["cbq_seeds"]["ppl"] == {"0": 22.5}  # the CFP-off run is not a seed of the shipped settings
    cells = _row((tmp_path / "quality.md").read_text(), "W4A8")
    assert (cells["CBQ (shipped recipe)"], cells["CBQ w/o CFP"]) == ("22.50", "22.90")


def test_cells_calibrated_on_different_rows_are_named_under_the_table(quality) -> None:
    """A recipe that draws more rows than its record's other cells did gets a line saying so."""
    record = _record("W2A16G64", 20.0, 8.6e5, 58.6, {"gptq": {"status": "ok", "settings": {"samples": 32, "seqlen": 512}}})
    record["cbq_report"]["calibration"] = {"num_samples": 64, "seqlen": 512}
    record["paper_run"] = {"report": {"calibration": {"num_samples": 32, "seqlen": 512}}}
    assert quality._calibration_note(record) == (
        "  - calibration rows differ between cells: CBQ (shipped recipe) 64 x 512, CBQ (paper settings) 32 x 512, "
        "gptq 32 x 512 (the same seed draws the rows, so a smaller set is the first rows of a larger one)")
    record["cbq_report"]["calibration"]["num_samples"] = 32
    assert quality._calibration_note(record) is None


def test_a_single_thread_run_time_is_marked(quality) -> None:
    assert quality._threads_note("cpu (x86_64, 1 threads)") == " (1 thread)"
    assert quality._threads_note("cpu (x86_64, 2 threads)") == ""
    assert quality._threads_note("NVIDIA H200") == "" and quality._threads_note(None) == ""
    row = {**quality._row("W4A8", {"results": [{"ppl": 20.0}]}, _run(38.0), _run(22.5, wall=3360.0)),
           "is_cbq": True, "cbq_device": "cpu (x86_64, 1 threads)"}
    assert _row(quality._table([row]), "W4A8")["CBQ time"] == "56.0 min (1 thread)"


def test_a_cell_of_an_earlier_recipe_is_marked(quality, tmp_path: Path, monkeypatch) -> None:
    """A CBQ cell whose recorded settings are not today's recipe's says so; a cell of the recipe's own settings
    and a record that predates the settings field are shown as they are."""
    monkeypatch.setattr(quality, "_draw", lambda folder, suffix: None)
    record = _record("W4A16", 20.0, 37.0, 23.97)
    settings, _seed = quality.recipe_settings(REPO / "configs" / "smollm2_w4a16.yaml", ["--extensions.rotation", "null"])
    record["row"]["cbq_settings"] = quality._fingerprint(settings)  # ran the recipe without its rotation
    (tmp_path / "quality_w4a16.json").write_text(json.dumps(record))
    assert quality.main(["--redraw", "--output", str(tmp_path)]) == 0
    assert _row((tmp_path / "quality.md").read_text(), "W4A16")["CBQ (shipped recipe)"] == "23.97 (earlier recipe)"
    current, _seed = quality.recipe_settings(REPO / "configs" / "smollm2_w4a16.yaml", [])
    record["row"]["cbq_settings"] = quality._fingerprint(current)
    (tmp_path / "quality_w4a16.json").write_text(json.dumps(record))
    assert quality.main(["--redraw", "--output", str(tmp_path)]) == 0
    assert _row((tmp_path / "quality.md").read_text(), "W4A16")["CBQ (shipped recipe)"] == "23.97"
    del record["row"]["cbq_settings"]
    assert quality._cell_is_current(record) is None


def test_an_extension_added_later_enters_the_fingerprint_only_when_on() -> None:
    """A record made before ``end_to_end`` existed stays valid while the recipe leaves it off; turning it on is a
    different run."""
    from benchmarks.quality import run_settings

    base = {"method": "cbq", "quant": {"scheme": "W3A16G64"}}
    assert run_settings({**base, "end_to_end": None}) == run_settings(base)
    assert run_settings({**base, "end_to_end": {"epochs": 1}}) != run_settings(base)
    # older sections: always part of the settings
    assert "extensions.rotation" in run_settings({**base, "extensions": {"rotation": None}})


def test_a_key_added_later_to_an_extension_enters_the_fingerprint_only_when_on() -> None:
    """``extensions.end_to_end.norms`` came after the W4A16 and W3A16G64 records (made with the phase on): off, the
    phase computes what it computed then, and the records keep their fingerprints."""
    from benchmarks.quality import run_settings

    def settings(**phase: object) -> dict:
        return run_settings({"quant": {"scheme": "W4A16"}, "extensions": {"end_to_end": {"epochs": 4, **phase}}})

    assert settings(norms=False) == settings()
    assert settings(norms=True) != settings() and settings(norms=True)["extensions.end_to_end.norms"] is True


def test_a_changed_default_that_a_weight_only_run_never_uses_keeps_its_records() -> None:
    """``extensions.end_to_end.activation_clip`` became false after the W4A16 and W3A16G64 records were made with
    true: a weight-only run computes the same bits under either value and keeps its fingerprint; at W4A4 the value
    is part of what the run computed."""
    from benchmarks.quality import run_settings

    def settings(scheme: str, clip: bool) -> dict:
        return run_settings({"quant": {"scheme": scheme}, "extensions": {"end_to_end": {"epochs": 4, "activation_clip": clip}}})

    assert settings("W4A16", False) == settings("W4A16", True)
    assert settings("W4A16", False)["extensions.end_to_end.activation_clip"] is True
    assert settings("W4A4", False) != settings("W4A4", True)
    assert "extensions.end_to_end.activation_clip" not in run_settings({"quant": {"scheme": "W4A16"}})


def test_a_key_moved_to_another_section_keeps_the_records_fingerprints() -> None:
    """A run made before keys moved into ``extensions`` and ``advanced`` (its config.yaml says ``quant.gptq``,
    ``guard.retries``) has today's settings, and the fingerprint of today's settings is the one the committed records
    were made with (taken under the old names): the moves change no record's validity."""
    import hashlib

    from benchmarks.quality import RETIRED_KEYS, _fingerprint, run_settings

    before = {"method": "cbq", "quant": {"scheme": "W3A16G64", "gptq": {"damp": 0.01}}, "rotation": None,
              "loss": {"kl_weight": 0.0, "output_kl_weight": 1.0}, "guard": {"retries": 2},
              "trainer": {"deterministic": False, "log_every_n_steps": 1}, "monitor": {"rtn_reference": False}}
    today = {"method": "cbq", "quant": {"scheme": "W3A16G64"}, "loss": {"kl_weight": 0.0},
             "extensions": {"gptq": {"damp": 0.01}, "rotation": None, "output_kl_weight": 1.0},
             "advanced": {"guard": {"retries": 2}, "trainer": {"deterministic": False, "log_every_n_steps": 1},
                          "monitor": {"rtn_reference": False}}}
    assert run_settings(before) == run_settings(today)
    assert "extensions.gptq.damp" in run_settings(before) and "quant.gptq.damp" not in run_settings(before)
    assert "advanced.guard.retries" in run_settings(before) and "guard.retries" not in run_settings(before)
    # where a run was shown and watched is not part of what it computed, under either name
    assert not any(key.startswith("advanced.monitor") or key.endswith("log_every_n_steps")
                   for key in run_settings(before))
    old_names = {**RETIRED_KEYS, "method": "cbq", "quant.scheme": "W3A16G64", "quant.gptq.damp": 0.01, "rotation": None,
                 "loss.kl_weight": 0.0, "loss.output_kl_weight": 1.0, "guard.retries": 2,
                 "trainer.deterministic": False}
    legacy = hashlib.sha256(json.dumps(old_names, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert _fingerprint(run_settings(today)) == legacy
