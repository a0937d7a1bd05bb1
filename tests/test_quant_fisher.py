"""quantize --analyze's second-order estimate (nemoconv/quant/fisher.py) and the fisher method of the analysis."""

from __future__ import annotations

import json

import pytest
import torch

import nemoconv
from nemoconv.checkpoint.local import open_checkpoint
from nemoconv.quant import fisher, fp8
from nemoconv.quant.analyze import _analysable
from nemoconv.quant.calibrate import calibration_tokens, run_calibration
from nemoconv.quant.sweep import Variant, compare_variants
from tests.helpers import run_cli
from tests.test_quant_analysis import DAMAGED, _damaged

CPU = torch.device("cpu")


def _setup(src, samples=8, seq_len=32, keep_rows=0):
    ck = open_checkpoint(src)
    names = [m.name for m in _analysable(ck)]
    ids = calibration_tokens(ck, None, samples, seq_len).ids
    calib = run_calibration(ck, names, ids, CPU, torch.float32, "builtin", keep_rows=keep_rows)
    return ck, names, ids, calib


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_row_sums_are_the_derivative_of_the_sampled_log_likelihood(tiny_dir, monkeypatch, kind):
    """X_r = Σ_t g_tᵀ ε_t (what the estimate squares) is d/dδ Σ_t log p(y_t) with ε scaled by δ added to the
    linear's output, for the sampled labels: checked by central differences on the whole model, per probe row,
    for a Mamba, an MLP or routed expert and a shared expert linear (the token → row bookkeeping of experts)."""
    src = tiny_dir(kind, trained_like=True)
    ck, names, ids, calib = _setup(src)
    drawn = []
    real = fisher._draw_labels
    monkeypatch.setattr(fisher, "_draw_labels", lambda p, s, g: drawn.append(real(p, s, g)) or drawn[-1])
    probe = ids[:3]
    est = fisher.estimate_kl(ck, probe, names, calib.amax, CPU, torch.float32, label_samples=2)
    label_sets = torch.cat(drawn)                                        # [positions, 2]
    model = nemoconv.load_model(src)
    picks = [n for n in names if n.endswith("in_proj")][:1] + [n for n in names if "experts.0." in n or
                                                                "up_proj" in n][:1]
    picks += [n for n in names if "shared_experts.down_proj" in n][:1]
    assert len(picks) >= 2
    for name in picks:
        lin = model.get_submodule(name)
        q, weight_scale, _ = fp8.quantize_weight(lin.weight.detach(), name)
        input_scale = fp8.scale_from_amax(calib.amax[name])

        def loglik(delta, labels):
            def hook(module, args, out):
                eps = fisher.fp8_linear(args[0], q, weight_scale, input_scale, module.bias) - out
                return out + delta * eps
            handle = lin.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    logp = torch.log_softmax(model(probe).double(), -1)
            finally:
                handle.remove()
            return logp.gather(-1, labels[..., None])[..., 0].sum(-1)       # per row
        delta = 0.05
        for k in range(2):   # label set k: its own backward pass through the layer's one forward
            labels = label_sets[:, k].reshape(probe.shape)
            numeric = (loglik(delta, labels) - loglik(-delta, labels)) / (2 * delta)
            got = est.row_sums[name][k * probe.shape[0]:(k + 1) * probe.shape[0]].float()
            assert numeric.abs().max() > 0, name
            assert torch.allclose(got, numeric.float(), rtol=0.05, atol=0.02 * float(numeric.abs().max())), \
                (name, k, got, numeric)


def test_label_sets_are_independent_copies_in_any_chunking(tiny_dir, monkeypatch):
    """S label sets are S backward passes through one forward of the probe rows (ε computed once, experts
    included): with every set given the same labels, each set's row sums equal the one-set run's, also when
    the rows are cut into chunks."""
    ck, names, ids, calib = _setup(tiny_dir("moe", trained_like=True))
    probe = ids[:3]
    real = fisher._draw_labels
    monkeypatch.setattr(fisher, "_draw_labels", lambda p, s, g: real(p, 1, g).expand(-1, s))
    one = fisher.estimate_kl(ck, probe, names, calib.amax, CPU, torch.float32, label_samples=1)
    monkeypatch.setattr(fisher, "TOKENS_PER_BATCH", {"cpu": 2 * ids.shape[1]})
    three = fisher.estimate_kl(ck, probe, names, calib.amax, CPU, torch.float32, label_samples=3)
    for n in names:
        want = one.row_sums[n]
        assert three.row_sums[n].shape == (9,)
        # the chunks are float32 products of other batch shapes, which MKL may sum in another order: on an AVX2
        # EPYC up to 1e-3 of the largest sum (3.6e-6 elsewhere); sets that shared or added up their sums would be
        # off by whole multiples
        for copy in three.row_sums[n].view(3, 3):
            assert torch.allclose(copy, want, rtol=1e-3, atol=5e-3 * float(want.abs().max())), n
        assert three.kl[n] == pytest.approx(one.kl[n], rel=1e-3)


def test_estimate_tracks_the_exact_kl(tiny_dir):
    """On a trained-like model the estimate ranks the linears as the exact sweep does (rank correlation) and
    stays within a small factor of it in total."""
    ck, names, ids, calib = _setup(tiny_dir("dense", trained_like=True))
    probe = ids[:4]
    est = fisher.estimate_kl(ck, probe, names, calib.amax, CPU, torch.float32, label_samples=16)
    exact = compare_variants(ck, probe, [Variant(n, frozenset([n])) for n in names], calib.amax, CPU, torch.float32)
    exact_kl = [exact[n].summary()["kl_mean"] for n in names]
    rho = fisher.spearman([est.kl[n] for n in names], exact_kl)
    assert rho > 0.6, rho
    ratio = sum(est.kl.values()) / sum(exact_kl)
    assert 0.4 < ratio < 2.5, ratio


def test_spearman():
    assert fisher.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert fisher.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert fisher.spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)


def test_outlier_channel_is_ranked_first_by_the_estimate_and_measured(tmp_path, capsys):
    src = _damaged(tmp_path)
    report = tmp_path / "analysis.json"
    code, out, err = run_cli(["quantize", src, "--analyze", "--calib-samples", "8", "--calib-seq-len", "32",
                              "--analyze-samples", "2", "--analyze-top", "3", "--device", "cpu", "--report", report],
                             capsys)
    assert code == 0, err
    result = json.loads(report.read_text())
    assert result["analysis"]["method"] == "fisher" and result["analysis"]["exact_top_k"] == 3
    rows = result["modules"]
    by_estimate = max(rows, key=lambda r: r["est_kl"] or -1)
    assert by_estimate["module"] == DAMAGED
    assert rows[0]["module"] == DAMAGED and rows[0]["measured"] and rows[0]["kl"] > 1.2 * rows[1]["kl"]
    assert sum(r["measured"] for r in rows) == 3
    assert all(r["kl"] is None for r in rows if not r["measured"])
    assert all(r["est_kl"] is not None for r in rows)
    assert "est. KL" in out


def test_fisher_analysis_is_deterministic_and_exact_method_still_measures_all(tiny_dir):
    src = tiny_dir("moe", trained_like=True)
    kw = dict(calib_samples=4, calib_seq_len=16, probe_samples=2, device="cpu", calibrator="builtin")
    a, b = nemoconv.analyze_fp8(src, top_k=2, **kw), nemoconv.analyze_fp8(src, top_k=2, **kw)
    assert [(r["module"], r["est_kl"], r["kl"]) for r in a["modules"]] == \
        [(r["module"], r["est_kl"], r["kl"]) for r in b["modules"]]
    assert [g["est_kl"] for g in a["groups"]] == [g["est_kl"] for g in b["groups"]]
    exact = nemoconv.analyze_fp8(src, method="exact", **kw)
    assert exact["analysis"] == {"method": "exact", "bytes_kept_on_device": 0}
    assert all(r["measured"] and r["est_kl"] is None for r in exact["modules"] if r["sqnr_db"] is not None)
    # the measured rows of the fisher run carry the exact method's numbers
    exact_kl = {r["module"]: r["kl"] for r in exact["modules"]}
    for r in a["modules"]:
        if r["measured"]:       # the same sums in other float32 batch shapes: 2.7e-5 apart on an AVX2 EPYC
            assert r["kl"] == pytest.approx(exact_kl[r["module"]], rel=2e-4)


def test_saved_hidden_states_are_what_the_docstring_says(tiny_dir):
    """(n_layers + 1) probe hidden states, the same whether the forward runs here or calibration kept them."""
    src = tiny_dir("dense", trained_like=True)
    ck, names, ids, calib = _setup(src, keep_rows=2)
    spec = ck.spec
    probe = ids[:2]
    assert len(calib.kept) == len(spec.layer_codes) + 1
    assert all(h.shape == (2, ids.shape[1], spec.hidden_size) for h in calib.kept)
    alone = fisher.estimate_kl(ck, probe, names, calib.amax, CPU, torch.float32, label_samples=2)
    reused = fisher.estimate_kl(ck, probe, names, calib.amax, CPU, torch.float32, label_samples=2, kept=calib.kept)
    assert alone.saved_bytes == reused.saved_bytes == (len(spec.layer_codes) + 1) * probe.numel() * spec.hidden_size * 4
    for n in names:
        assert reused.kl[n] == pytest.approx(alone.kl[n], rel=1e-4)


def test_exact_sweep_from_the_estimate_states_equals_the_sweep_alone(tiny_dir):
    """compare_variants(reference=estimate.hidden) skips the reference stream and starts at the first FP8 layer,
    with the numbers the full sweep gives (shortcut variants, in_proj variants, late-layer variants)."""
    ck, names, ids, calib = _setup(tiny_dir("dense", trained_like=True), keep_rows=3)
    probe = ids[:3]
    est = fisher.estimate_kl(ck, probe, names, calib.amax, CPU, torch.float32, label_samples=1, kept=calib.kept)
    assert len(est.hidden) == len(ck.spec.layer_codes) + 1
    picks = [n for n in names if n.startswith(("backbone.layers.2.", "backbone.layers.5.", "backbone.layers.6."))]
    for chosen in (picks, picks[-2:]):
        variants = [Variant(n, frozenset([n])) for n in chosen]
        alone = compare_variants(ck, probe, variants, calib.amax, CPU, torch.float32)
        reused = compare_variants(ck, probe, variants, calib.amax, CPU, torch.float32, reference=est.hidden)
        for v in variants:
            a, b = alone[v.name].summary(), reused[v.name].summary()
            assert a["kl_mean"] > 0
            assert b["kl_mean"] == pytest.approx(a["kl_mean"], rel=1e-4), v.name
            assert b["top1_agreement"] == a["top1_agreement"]


@pytest.mark.parametrize("args, message", [
    (["--analyze-method", "guess"], "--analyze-method"),
    (["--analyze-top", "-1"], "--analyze-top"),
    (["--analyze-top", "many"], "--analyze-top"),
    (["--analyze-top", "2", "--analyze-method", "exact"], "--analyze-top goes with --analyze-method fisher"),
])
def test_garbage_analysis_options_are_one_line_exit_2(tiny_dir, capsys, args, message):
    code, _, err = run_cli(["quantize", tiny_dir("dense"), "--analyze", *args], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_analysis_options_need_analyze(tiny_dir, tmp_path, capsys):
    code, _, err = run_cli(["quantize", tiny_dir("dense"), tmp_path / "out", "--analyze-method", "fisher"], capsys)
    assert code == 2 and "go with --analyze" in err


@pytest.mark.parametrize("kw", [{"method": "fast"}, {"top_k": -1}, {"top_k": True}, {"top_k": 1.5},
                                {"label_samples": 0}, {"label_samples": "4"}])
def test_garbage_api_values_are_nemoconv_errors(tiny_dir, kw):
    with pytest.raises(nemoconv.NemoconvError):
        nemoconv.analyze_fp8(tiny_dir("dense"), calib_samples=2, calib_seq_len=8, device="cpu", **kw)


def test_a_top_k_beyond_the_linears_measures_them_all(tiny_dir):
    """--analyze-top larger than the number of linears (a lie about how many there are) measures every one."""
    kw = dict(calib_samples=4, calib_seq_len=16, probe_samples=1, device="cpu", calibrator="builtin")
    result = nemoconv.analyze_fp8(tiny_dir("dense", trained_like=True), top_k=10_000, **kw)
    rows = [r for r in result["modules"] if r["sqnr_db"] is not None]
    assert rows and all(r["measured"] and r["kl"] is not None and r["est_kl"] is not None for r in rows)
    assert [r["kl"] for r in rows] == sorted((r["kl"] for r in rows), reverse=True)


@pytest.mark.parametrize("calibrator", ["builtin", "modelopt"])
def test_layers_kept_on_the_device_are_not_read_again_and_change_nothing(tiny_dir, monkeypatch, calibrator):
    """KeptLayers (the GPU keeps what fits of the layers between the analysis's passes; on CUDA only, so forced
    on here): calibration reads every layer once, the estimate and the exact sweep read none of them again, and
    the report's numbers are those of the analysis that re-reads every layer. With ModelOpt's calibrator too,
    which swaps the block's linears for its own modules around the kept weights."""
    from nemoconv.quant import layer_reads

    if calibrator == "modelopt":
        pytest.importorskip("modelopt.torch.quantization")
    src = tiny_dir("moe", trained_like=True)
    kw = dict(calib_samples=8, calib_seq_len=32, device="cpu", calibrator=calibrator, top_k=3)
    plain = nemoconv.analyze_fp8(src, **kw)
    reads = []
    real_read, real_init = layer_reads.read_hf, layer_reads.KeptLayers.__init__

    def init(self, device):
        real_init(self, device)
        self.enabled = True
    monkeypatch.setattr(layer_reads.KeptLayers, "__init__", init)
    monkeypatch.setattr(layer_reads, "read_hf", lambda ck, names, reader: reads.append(tuple(names)) or
                        real_read(ck, names, reader))
    kept = nemoconv.analyze_fp8(src, **kw)
    per_layer = [r for r in reads if any(".layers." in n for n in r)]
    assert len(per_layer) == len(open_checkpoint(src).spec.layer_codes) == len(set(per_layer))
    assert kept["analysis"]["bytes_kept_on_device"] > 0 == plain["analysis"]["bytes_kept_on_device"]
    assert [(r["module"], r["est_kl"], r["kl"], r["sqnr_db"]) for r in kept["modules"]] == \
        [(r["module"], r["est_kl"], r["kl"], r["sqnr_db"]) for r in plain["modules"]]


def test_kept_layers_leave_the_reserve_free(monkeypatch):
    """On a GPU a layer is kept only if KEEP_RESERVE_FRACTION of the memory stays free after it."""
    from nemoconv.quant import layer_reads

    kept = layer_reads.KeptLayers(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 << 20, 100 << 20))
    layer = [("w", torch.zeros(1 << 20, dtype=torch.uint8))]          # 1 MiB: 29 of 100 MiB left free
    moved = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moved.append(a) or self)
    assert kept.keep(0, layer) is kept.layers[0] and kept.bytes == 1 << 20 and moved == [(torch.device("cuda"),)]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (25 << 20, 100 << 20))
    assert kept.keep(1, layer) is layer and kept.get(1) is None and kept.bytes == 1 << 20
    kept.clear()
    assert kept.get(0) is None and kept.bytes == 0
