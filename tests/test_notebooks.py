"""The Colab notebooks: every one runs end to end in smoke mode, and is committed clean.

Smoke mode is the notebook exactly as committed, with its `parameters` cell followed by an
injected cell (as papermill does) that swaps the hub model and data set for the tiny random
Llama of conftest, the demo's local data and a few steps, and turns installation off. A last
cell prints the values the tests below check. A notebook with no entry in SMOKE fails
`test_every_notebook_has_a_smoke_run`, so none can be added without CI executing it.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import tomllib
import torch
import yaml

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
DEMO_DATA = REPO / "recipes" / "data" / "tiny-demo"
RESULTS_MARKER = "SMOKE_RESULTS "
CELL_TIMEOUT_S = 600


def smoke_01(model_dir: Path, work: Path) -> dict:
    return {
        "MODEL_ID": str(model_dir), "DATASET": str(DEMO_DATA / "train.jsonl"), "NUM_EXAMPLES": 64, "MAX_STEPS": 8,
        "MICRO_BATCH_SIZE": 8, "GRAD_ACCUM_STEPS": 1, "MAX_SEQ_LEN": 256, "LR": 1e-2, "OUTPUT_DIR": str(work / "quickstart"),
        "MAX_NEW_TOKENS": 4, "INSTALL": False,
    }  # fmt: skip


SMOKE_WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "lemon"]


def write_lowercase_data(work: Path) -> Path:
    """Alpaca records with lowercase answers, so that notebook 02's capitals task differs from the plain one."""
    path = work / "lowercase.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": "Repeat the word.", "input": w, "output": f"the word is {w}"} for w in SMOKE_WORDS * 8]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def smoke_02(model_dir: Path, work: Path) -> dict:
    return {
        "MODEL_ID": str(model_dir), "DATASET": str(write_lowercase_data(work)), "NUM_EXAMPLES": 64, "MAX_STEPS": 8,
        "MICRO_BATCH_SIZE": 8, "GRAD_ACCUM_STEPS": 1, "MAX_SEQ_LEN": 256, "NUM_VIRTUAL_TOKENS": 8, "LR": 1e-1,
        "OUTPUT_DIR": str(work / "prompt-tuning"), "MAX_NEW_TOKENS": 4, "INSTALL": False,
    }  # fmt: skip


def smoke_03(model_dir: Path, work: Path) -> dict:
    return {
        "REPO_DIR": str(REPO), "MODEL_ID": str(model_dir), "DATASET": str(DEMO_DATA / "train.jsonl"), "NUM_EXAMPLES": 32,
        "MAX_STEPS": 3, "MICRO_BATCH_SIZE": 8, "MAX_SEQ_LEN": 256, "OUTPUT_DIR": str(work / "plan-and-merge"), "INSTALL": False,
    }  # fmt: skip


def smoke_04(model_dir: Path, work: Path) -> dict:
    # The demo itself is the smoke run: offline, on the CPU, the real recipes (the tiny random model cannot learn ROT13).
    return {"MODEL_ID": "demo:tiny", "OUTPUT_DIR": str(work / "preference"), "INSTALL": False, "REPO_DIR": str(REPO)}


# name -> (smoke parameters, the expression whose value the last cell prints as JSON)
SMOKE = {
    "01_quickstart_qlora.ipynb": (
        smoke_01,
        '{"initial": summary["initial_eval_loss"], "final": summary["final_eval_loss"], "before": before, "after": after,'
        ' "merge_diff": report.max_logit_diff, "threshold": report.threshold, "merged_class": type(merged).__module__,'
        ' "adapter_files": sorted(p.name for p in Path(adapter_dir).iterdir()), "compute_dtype": str(compute_dtype)}',
    ),
    "02_prompt_tuning.ipynb": (
        smoke_02,
        '{"trainable": trainable, "hidden": model_config.hidden_size, "num_virtual_tokens": NUM_VIRTUAL_TOKENS,'
        ' "losses": {t: [s["initial_eval_loss"], s["final_eval_loss"]] for t, s in summaries.items()},'
        ' "neighbours": neighbours, "answers": [[p, n, a] for (p, n), a in answers.items()], "again": again}',
    ),
    "03_plan_and_merge.ipynb": (
        smoke_03,
        '{"recipes": [r.stem for r in recipes], "cards": list(CARDS), "card_sizes": list(CARDS.values()),'
        ' "plans": [[k[0], k[1], p.fits, p.total_bytes, p.largest_micro_batch] for k, p in verdicts.items()],'
        ' "variants": {k: [p.fits, p.total_bytes] for k, p in variant_plans.items()},'
        ' "merge_diff": report.max_logit_diff, "threshold": report.threshold, "quantization_config": "quantization_config" in merged_config,'
        ' "loading_info": {k: len(v) for k, v in loading_info.items()}, "merged_dtype": report.dtype}',
    ),
    "04_preference_tuning.ipynb": (
        smoke_04,
        '{"sft": [sft["initial_exact_match"], sft["final_exact_match"]], "loss": [dpo["initial_eval_loss"], dpo["final_eval_loss"]],'
        ' "accuracy": [dpo["initial_eval_rewards/accuracies"], dpo["final_eval_rewards/accuracies"]],'
        ' "exact_match": [dpo["initial_exact_match"], dpo["final_exact_match"]], "reference": reference["reference"],'
        ' "margins": [steps[0]["rewards/margins"], steps[-1]["rewards/margins"]], "plan_fits": plan.fits, "plan_total": plan.total_bytes}',
    ),
}


def list_notebooks() -> list[str]:
    return sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def read_notebook(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def find_parameters_cell(nb) -> int:
    indices = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(indices) == 1, f"need exactly one cell tagged 'parameters', found {len(indices)}"
    return indices[0]


def assigned_names(source: str) -> set[str]:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def execute_smoke(name: str, parameters: dict, results_expr: str, work: Path) -> dict:
    nb = read_notebook(name)
    index = find_parameters_cell(nb)
    injected = "# Injected by tests/test_notebooks.py (smoke mode)\nget_ipython().run_line_magic('colors', 'nocolor')  # plain tracebacks in CI logs\n"
    injected += "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(injected))
    nb.cells.append(nbformat.v4.new_code_cell(f"import json as _json\nprint({RESULTS_MARKER!r} + _json.dumps({results_expr}))"))
    env = {**os.environ, "MPLBACKEND": "Agg", "TQDM_MININTERVAL": "5"}
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    client.execute(env=env)  # a failing cell raises CellExecutionError with its traceback
    text = "".join(out.get("text", "") for out in nb.cells[-1].outputs if out.get("name") == "stdout")
    line = next(line for line in text.splitlines() if line.startswith(RESULTS_MARKER))
    return json.loads(line[len(RESULTS_MARKER):])


@pytest.fixture(scope="module")
def smoke_results(tiny_llama_dir, tmp_path_factory):
    """Each notebook executed once per test session, on demand."""
    cache: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in cache:
            work = tmp_path_factory.mktemp(name.split("_")[0])
            make_parameters, results_expr = SMOKE[name]
            cache[name] = execute_smoke(name, make_parameters(tiny_llama_dir, work), results_expr, work)
        return cache[name]

    return run


# ---------------------------------------------------------------------------- every notebook


def test_every_notebook_has_a_smoke_run():
    assert list_notebooks(), "notebooks/ holds no notebook"
    assert sorted(SMOKE) == list_notebooks(), "add an entry to SMOKE for every notebook (CI executes only those)"


@pytest.mark.parametrize("name", list_notebooks())
def test_notebook_is_committed_clean(name):
    nb = read_notebook(name)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "no code cell"
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code), "outputs not stripped"
    assert "widgets" not in nb.metadata
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", list_notebooks())
def test_notebook_has_badge_and_parameters(name, tmp_path):
    nb = read_notebook(name)
    repo_url = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    repo = repo_url.removeprefix("https://github.com/")
    badge = f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/{name}"
    assert badge in nb.cells[0].source, "the first cell needs the Open in Colab badge for this notebook's path"
    parameters = nb.cells[find_parameters_cell(nb)].source
    names = assigned_names(parameters)
    make_parameters, _ = SMOKE[name]
    smoke_names = set(make_parameters(tmp_path / "model", tmp_path / "work"))
    assert smoke_names <= names, f"smoke parameters not set in the parameters cell: {sorted(smoke_names - names)}"
    assert {"MODEL_ID", "INSTALL", "REPO_URL"} <= names
    assert f'REPO_URL = "{repo_url}"' in parameters


# ---------------------------------------------------------------------------- what each one shows


def test_quickstart_trains_generates_and_merges(smoke_results):
    r = smoke_results("01_quickstart_qlora.ipynb")
    assert r["compute_dtype"] == "torch.float32"  # CPU; the GPU picks bf16, or fp16 on a T4
    assert r["final"] < r["initial"] - 0.5, "8 steps at lr 1e-2 on the tiny model cut the held-out loss by > 0.5 nats"
    assert len(r["before"]) == len(r["after"]) == 3
    assert r["before"] != r["after"], "the trained adapter changed no answer"
    assert {"adapter_config.json", "adapter_model.safetensors", "qlora_lite.json"} <= set(r["adapter_files"])
    assert r["merged_class"].startswith("transformers.models.llama")
    assert r["merge_diff"] <= r["threshold"]


def test_prompt_tuning_counts_trains_inspects_and_swaps(smoke_results, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    r = smoke_results("02_prompt_tuning.ipynb")
    assert r["trainable"]["prompt_tuning"] == r["num_virtual_tokens"] * r["hidden"] == 8 * 64
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    assert r["trainable"]["lora"] == sum(16 * (m.in_features + m.out_features) for m in linears) == 32768
    for task, (initial, final) in r["losses"].items():
        assert final < initial - 0.3, f"{task}: eval loss {initial:.3f} -> {final:.3f}"
    assert r["losses"]["plain"][0] != r["losses"]["caps"][0], "the capitals task has the same data as the plain one"
    assert len(r["neighbours"]) == 8
    for row in r["neighbours"]:
        sims = [sim for _, _, sim in row]
        assert len(row) == 3 and sims == sorted(sims, reverse=True) and all(-1 <= s <= 1 for s in sims)
    answers = {(prompt, name): answer for prompt, name, answer in r["answers"]}
    first = next(iter(answers))[0]
    assert r["again"] == answers[(first, "plain")], "switching plain -> caps -> plain changed the answer"
    assert any(answers[(p, "plain")] != answers[(p, "caps")] for p, _ in answers), "the two prompts answer alike"


def test_plan_and_merge_plans_every_recipe_and_merges(smoke_results):
    from qlora_lite.config import load_recipe
    from qlora_lite.planner import GIB, parse_bytes, plan_memory

    r = smoke_results("03_plan_and_merge.ipynb")
    planned = [p for p in sorted((REPO / "recipes").glob("*.yaml")) if not load_recipe(p).model.name_or_path.startswith("demo:")]
    # the one-GPU recipes; those for several GPUs carry a dist: section and launch with torchrun (planned per GPU by test_planner)
    shipped = [p.stem for p in planned if "dist" not in yaml.safe_load(p.read_text())]
    several = [p for p in planned if p.stem not in shipped]
    assert r["recipes"] == shipped == ["llama3.1-8b-128k", "llama3.1-8b-alpaca", "llama3.1-8b-dpo", "mistral-7b-alpaca", "qwen2.5-7b-alpaca"]
    assert several and all("torchrun --standalone --nproc_per_node" in p.read_text() for p in several)
    assert len(r["plans"]) == 5 * len(r["cards"])
    for recipe in shipped:
        rows = [row for row in r["plans"] if row[0] == recipe]
        # per card: model.tiled_mlp and model.activation_offload auto depend on what the card holds
        expected = [plan_memory(load_recipe(REPO / "recipes" / f"{recipe}.yaml"), vram_bytes=parse_bytes(size)).total_bytes for size in r["card_sizes"]]
        assert [row[3] for row in rows] == expected, "the notebook's estimate differs from plan_memory's"
        largest = [row[4] for row in rows]  # T4, 24 GB, 80 GB
        assert largest == sorted(largest) and largest[-1] > largest[0]
        # every recipe fits its 24 GB card and the 80 GB one; the 128k one (16.7 GiB) not a T4's 15 GiB
        assert [row[2] for row in rows] == [recipe != "llama3.1-8b-128k", True, True]
    variants = r["variants"]
    assert variants["as shipped"][0] and not variants["Llama-3.1-70B"][0]
    assert variants["Llama-3.1-70B"][1] > 37 * GIB
    # With the chunked loss, sequence length moves only the activations (1.24x for 2048 -> 4096);
    # 4x the micro-batch and turning checkpointing off cost far more (1.71x, 3.24x).
    for label, factor in (("seq 4096", 1.2), ("micro-batch 8", 1.6), ("no gradient checkpointing", 3.0)):
        assert variants[label][1] > factor * variants["as shipped"][1], label
    assert r["merge_diff"] <= r["threshold"] and r["merged_dtype"] == "float32"
    assert r["quantization_config"] is False
    assert r["loading_info"] == {"missing_keys": 0, "unexpected_keys": 0, "mismatched_keys": 0, "error_msgs": 0}


def test_preference_notebook_runs_the_demo_sft_then_dpo(smoke_results):
    r = smoke_results("04_preference_tuning.ipynb")
    assert r["sft"][1] >= 0.9, f"the SFT demo's exact match ended at {r['sft'][1]:.0%}"
    # The policy starts as its reference: ln 2 exactly (fp32 on the CPU), every reward 0, a tie everywhere.
    assert abs(r["loss"][0] - 0.6931471805599453) < 1e-6 and r["accuracy"][0] == 0.0
    # Measured: 99% of the 100 held-out pairs ranked right after 50 steps (the bar: 95%), exact match kept at 100%.
    assert r["accuracy"][1] >= 0.95 and r["loss"][1] < 0.3
    assert r["exact_match"][1] >= 0.9 and r["margins"][1] > r["margins"][0]
    assert r["reference"] in ("computed", "cached")
    assert r["plan_fits"] and 8.0 * 2**30 < r["plan_total"] < 9.0 * 2**30  # the 8B DPO recipe's header: 8.35 GiB
