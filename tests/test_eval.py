"""The eval suite end to end on a tiny random checkpoint in a tmp workdir: every task through eval/run.py into
results.json keyed by step, perplexity against a direct computation, the MQAR generator's layout, and the lm-eval
model class (its three request types, and a local task file run with the hub switched off)."""
import json
import math
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs.common import base_config
from eval import mqar, run as eval_run
from nha_jax.generate import load_model
from nha_jax.training.config import save_run_config
from nha_jax.sharding import make_mesh
from nha_jax.training.checkpoint import Checkpointer
from nha_jax.training.optimizer import build_optimizer
from nha_jax.training.state import state_layout

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT = DATA / "wikitext-2" / "test.txt"
STEP = 7


def forward(model, tokens):
    """model(tokens) under jax.jit (eager NNX calls compile op by op)."""
    graphdef, params = nnx.split(model)
    return jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))(params, tokens)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A random-init checkpoint at step 7 (byte tokens, 2 layers: window 8 with 4 slots, and a full layer)."""
    config = base_config()
    config.workdir = str(tmp_path_factory.mktemp("eval_run"))
    config.seq_len = 32
    config.model.update(vocab_size=384, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                        v_head_dim=16, num_slots=4, window=8, block_size=2, full_idx=1, chunk_size=16,
                        compute_dtype="float32")
    layout = state_layout(config, build_optimizer(config.optimizer, config.total_steps),
                          make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    state = jax.jit(layout.init_fn, out_shardings=layout.shardings)(jax.random.PRNGKey(0))
    checkpointer = Checkpointer(config.workdir, keep=1, async_save=False)
    checkpointer.save(STEP, state, {})
    checkpointer.wait()
    checkpointer.close()
    save_run_config(config.workdir, config)
    return config.workdir


def test_every_task_writes_results_keyed_by_step(workdir, capsys):
    pytest.importorskip("matplotlib")  # the `eval` extra: passkey and efficiency draw their plots
    out = Path(workdir) / "eval" / "results.json"
    code = eval_run.main(["--workdir", workdir, "--tasks", "perplexity,mqar,passkey,efficiency",
                          "--text-file", str(WIKITEXT), "--max-tokens", "512", "--batch-size", "8",
                          "--mqar-settings", "4x32,4x64", "--mqar-samples", "8", "--passkey-lengths", "128",
                          "--passkey-depths", "0,1", "--passkey-samples", "2", "--contexts", "64",
                          "--decode-steps", "2"])
    assert code == 0
    results = json.loads(out.read_text())[str(STEP)]
    assert set(results) == {"perplexity", "mqar", "passkey", "efficiency"}
    assert "## perplexity" in capsys.readouterr().out

    loaded = load_model(workdir)
    tokens = np.asarray(loaded.tokenizer.encode(WIKITEXT.read_text()[:4000]), np.int32)[:512].reshape(16, 32)
    logits = forward(loaded.model, jnp.asarray(tokens))
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], jnp.asarray(tokens[:, 1:]))
    wiki = results["perplexity"]["test.txt"]
    assert wiki["scored_tokens"] == 16 * 31
    assert wiki["perplexity"] == pytest.approx(math.exp(float(jnp.mean(nll))), rel=1e-4)

    assert [r["seq_len"] for r in results["mqar"].values()] == [32, 64]
    assert all(0 <= r["accuracy"] <= 1 for r in results["mqar"].values())
    assert set(results["passkey"]) == {"128@0.0", "128@1.0"}
    assert (out.parent / "passkey.png").stat().st_size > 0 and (out.parent / "efficiency.png").stat().st_size > 0
    nha, transformer = results["efficiency"]["nha"]["64"], results["efficiency"]["transformer"]["64"]
    # NHA: one slots-and-ring layer and one full layer (its KV cache: 64 + 2 tokens x (k + v) x 16 dims x 4
    # bytes); Transformer++: two full layers.
    assert nha["kv_cache_bytes"] == 66 * 2 * 16 * 4 + 66 and nha["nha_cache_bytes"] > 0
    assert transformer["kv_cache_bytes"] == 2 * nha["kv_cache_bytes"] and transformer["nha_cache_bytes"] == 0
    assert nha["decode_ms_per_token"] > 0 and transformer["prefill_s"] > 0


def test_generate_cli(workdir, capsys):
    from nha_jax import generate
    assert generate.main(["--workdir", workdir, "--prompt", "The", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith(f"[step {STEP}] The")
    assert generate.main(["--workdir", workdir, "--prompt", "The", "--step", "8"]) == 2


def test_bad_task_name_exits_2(workdir):
    with pytest.raises(SystemExit) as error:
        eval_run.main(["--workdir", workdir, "--tasks", "perplexity,recall"])
    assert error.value.code == 2


def test_mqar_batch_layout():
    data = mqar.mqar_batch(np.random.default_rng(0), batch=3, num_kv=5, seq_len=40, vocab_size=64)
    assert data["inputs"].shape == data["targets"].shape == (3, 40)
    for inputs, targets, mask in zip(data["inputs"], data["targets"], data["loss_mask"]):
        pairs = dict(zip(inputs[0:10:2], inputs[1:10:2]))
        assert len(pairs) == 5 and all(1 <= k < 32 <= v < 64 for k, v in pairs.items())
        queried = np.flatnonzero(mask)
        assert len(queried) == 5 and (queried >= 10).all()
        assert sorted(inputs[queried].tolist()) == sorted(pairs)
        assert all(targets[p] == pairs[inputs[p]] for p in queried)
    with pytest.raises(ValueError, match="num_kv"):
        mqar.mqar_batch(np.random.default_rng(0), batch=1, num_kv=40, seq_len=400, vocab_size=64)


TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_model_class(workdir, tmp_path, monkeypatch):
    lm_harness = pytest.importorskip("eval.lm_harness")  # the `eval` extra (lm_eval)
    loaded = load_model(workdir)
    lm = lm_harness.NHALM(loaded, batch_size=4)
    request = lambda *args: types.SimpleNamespace(args=args)

    # loglikelihood = the model's own log-probabilities of the continuation's tokens after BOS + context.
    (logprob, _), = lm.loglikelihood([request("The sky", " is blue")])
    tokens = [loaded.tokenizer.bos_id] + loaded.tokenizer.encode("The sky is blue")
    logits = forward(loaded.model, jnp.asarray([tokens]))[0]
    expected = jax.nn.log_softmax(logits[:-1])[jnp.arange(len(tokens) - 1), jnp.asarray(tokens[1:])][-8:].sum()
    assert logprob == pytest.approx(float(expected), rel=1e-4)
    rolling, = lm.loglikelihood_rolling([request("The sky is blue")])
    assert rolling == pytest.approx(float(jax.nn.log_softmax(logits[:-1])[jnp.arange(len(tokens) - 1),
                                                                           jnp.asarray(tokens[1:])].sum()), rel=1e-4)
    text, = lm.generate_until([request("The sky", {"until": ["\n"], "max_gen_toks": 3})])
    assert isinstance(text, str) and "\n" not in text

    # A local task file through lm-eval itself, with every hub lookup switched off.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": [" blue", " green"], "label": 0})
                              for q in ("The sky is", "The sea is", "My car is")))
    (tmp_path / "tiny_choice.yaml").write_text(TASK_YAML.format(data=data))
    results = lm_harness.evaluate(loaded, tasks=["tiny_choice"], include_path=str(tmp_path), batch_size=4,
                                  include_defaults=False)
    assert 0 <= results["tiny_choice"]["acc,none"] <= 1


def test_repro_report_table_and_plot(tmp_path):
    """eval/repro.py's table and plot of a report (the reproduction's own rows, docs/repro.json); a missing report
    is a usage error. The training runs themselves need a GPU's time (docs/RESULTS.md)."""
    pytest.importorskip("matplotlib")
    from eval import repro
    report_file = Path(__file__).resolve().parents[1] / "docs" / "repro.json"
    text = repro.table(json.loads(report_file.read_text()))
    assert "| transformer | 20.9M | 0.133 | 0.080 |" in text and "| nha | 21.6M | 4.062 | 2.022 |" in text
    out = tmp_path / "repro.png"
    repro.main(["--tasks", "none", "--report", str(report_file), "--plot", str(out)])
    assert out.stat().st_size > 10_000
    with pytest.raises(SystemExit) as exit_info:
        repro.main(["--tasks", "none", "--report", str(tmp_path / "missing.json"), "--plot", str(out)])
    assert exit_info.value.code == 2
