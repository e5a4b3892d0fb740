"""piscale sft: data layouts and completion-only labels, training through
transformers' Trainer by the recipe, resuming after a kill, the sweep, and
search outputs turned into SFT data. Tiny random-weight models throughout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from piscale.recipe import rank_by_early_indicators
from piscale.sft.data import IGNORE, DataError, read_examples, tokenise, training_order
from piscale.sft.searched import SearchedAnswer, sft_records, split_by_problem
from piscale.sft.train import SFTRecipe, completion_loss, read_metrics, total_steps, train

from tiny_models import char_tokenizer, tiny_causal_lm

SYSTEM = "Add."


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def sums(count: int, start: int = 0) -> list[dict]:
    return [
        {"prompt": f"{a}+{a % 3}=", "system": SYSTEM, "completion": f"{a + a % 3}"}
        for a in range(start, start + count)
    ]


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# -- data ---------------------------------------------------------------------


def test_completion_labels_are_exactly_the_assistants_tokens(tmp_path: Path):
    tokenizer = char_tokenizer()
    path = write(tmp_path / "d.jsonl", [{"prompt": "2+2=", "system": "Be brief.", "completion": "4"}])
    (example,) = read_examples(path)
    found = tokenise(example, tokenizer)
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert tokenizer.decode(found.input_ids) == text
    learned = [t for t in found.labels if t != IGNORE]
    # the answer, the end-of-turn token that stops generation, and the template's newline after it
    assert tokenizer.decode(learned) == "4<|im_end|>\n"
    assert found.labels[-len(learned) :] == found.input_ids[-len(learned) :]


def test_every_assistant_turn_of_a_conversation_is_learned(tmp_path: Path):
    tokenizer = char_tokenizer()
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    (example,) = read_examples(write(tmp_path / "d.jsonl", [{"messages": messages}]))
    found = tokenise(example, tokenizer)
    learned = tokenizer.decode([t if t != IGNORE else tokenizer.pad_token_id for t in found.labels])
    assert learned.replace("<pad>", "") == "yo<|im_end|>\n4<|im_end|>\n"


def test_both_layouts_give_the_same_tokens(tmp_path: Path):
    tokenizer = char_tokenizer()
    conversational = {
        "prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "1+1="}],
        "completion": [{"role": "assistant", "content": "2"}],
    }
    chat = {"messages": conversational["prompt"] + conversational["completion"]}
    plain = {"prompt": "1+1=", "system": SYSTEM, "completion": "2"}
    found = [tokenise(read_examples(write(tmp_path / f"{i}.jsonl", [r]))[0], tokenizer) for i, r in
             enumerate((conversational, chat, plain))]
    assert found[0] == found[1] == found[2]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": "hello"}, "expected a 'messages' list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "starts with the assistant"),
        ({"prompt": "hi", "completion": [{"role": "user", "content": "x"}]}, "assistant messages only"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "needs a role"),
    ],
)
def test_bad_records_are_refused_with_their_line(tmp_path: Path, record: dict, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
        read_examples(path)


def test_long_examples_are_refused_not_cut(tmp_path: Path):
    (example,) = read_examples(write(tmp_path / "d.jsonl", [{"prompt": "x" * 50, "completion": "y"}]))
    with pytest.raises(DataError, match="more than max_length 40"):
        tokenise(example, char_tokenizer(), max_length=40)


def test_stacked_order_pools_and_reshuffles_phased_runs_each_phase_in_turn():
    stacked = training_order([3, 2], epochs=2, seed=0)
    assert len(stacked) == 10 and sorted(stacked[:5]) == sorted(stacked[5:]) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert stacked[:5] != stacked[5:] or stacked == training_order([3, 2], epochs=2, seed=0)
    phased = training_order([3, 2], epochs=2, seed=0, phased=True)
    assert [p for p, _ in phased] == [0] * 6 + [1] * 4
    assert sorted(phased[:3]) == sorted(phased[3:6]) == [(0, 0), (0, 1), (0, 2)]
    assert training_order([3, 2], epochs=2, seed=1) != stacked  # the seed draws the order


# -- training -----------------------------------------------------------------


def test_loss_falls_and_the_saved_folder_is_the_trained_model(tmp_path: Path):
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    data = write(tmp_path / "d.jsonl", sums(8))
    recipe = SFTRecipe(learning_rate=3e-3, examples_per_step=4, micro_batch=2, epochs=8)
    before = completion_loss(model, tokenizer, [data], recipe)
    run = train(model, tokenizer, [data], tmp_path / "out", recipe)
    assert run.finished and run.steps == run.total_steps == total_steps(64, recipe) == 16
    losses = [m.loss for m in run.metrics]
    assert [m.step for m in run.metrics] == list(range(1, 17))
    assert losses[-1] < 0.5 * losses[0]
    after = completion_loss(model, tokenizer, [data], recipe)
    assert after < 0.5 * before
    # constant learning rate, no warm-up; gradient norms recorded before clipping
    assert {m.learning_rate for m in run.metrics} == {3e-3}
    assert all(m.grad_norm > 0 for m in run.metrics)
    assert (tmp_path / "out" / "metrics.png").is_file() and not (tmp_path / "out" / "checkpoints").exists()
    summary = json.loads((tmp_path / "out" / "sft.json").read_text())
    assert summary["steps"] == 16 and summary["examples"] == 8
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert completion_loss(reloaded, tokenizer, [data], recipe) == pytest.approx(after, rel=1e-5)


def test_a_steps_logged_loss_is_the_mean_over_its_completion_tokens(tmp_path: Path):
    model, tokenizer = tiny_causal_lm("llama", seed=3)
    # the first step of a one-epoch run over 4 examples at 4 per step is all of them
    data = write(tmp_path / "d.jsonl", [{"prompt": "q" * (i + 1), "completion": "a" * (3 * i + 1)} for i in range(4)])
    recipe = SFTRecipe(learning_rate=1e-3, examples_per_step=4, micro_batch=2)
    expected = completion_loss(model, tokenizer, [data], recipe)
    run = train(model, tokenizer, [data], tmp_path / "out", recipe)
    assert run.metrics[0].loss == pytest.approx(expected, rel=1e-4)


def bigram_model(seed: int):
    """A causal LM with no layers: each position's prediction depends on its
    own token only, so changing a prompt token changes only predictions made
    at prompt positions."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = char_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=0,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config), tokenizer


@pytest.mark.parametrize("completion_only", [True, False])
def test_a_prompt_token_change_leaves_the_completion_only_loss_unchanged(tmp_path: Path, completion_only: bool):
    original = [{"prompt": "What is 12+7?", "system": "Add.", "completion": "19"}] * 4
    changed = [{"prompt": "What is 98-3?", "system": "Sum!", "completion": "19"}] * 4
    recipe = SFTRecipe(learning_rate=1e-2, examples_per_step=2, micro_batch=1, completion_only=completion_only)
    runs = []
    for name, records in (("original", original), ("changed", changed)):
        model, tokenizer = bigram_model(seed=0)
        runs.append(train(model, tokenizer, [write(tmp_path / f"{name}.jsonl", records)], tmp_path / name, recipe))
    first, second = ([m.loss for m in run.metrics] for run in runs)
    assert len(first) == 2
    if completion_only:
        assert first == pytest.approx(second, abs=1e-6)  # every step, not just the first
    else:  # the control: with the prompt in the loss, the same change moves it
        assert abs(first[0] - second[0]) > 1e-2


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path: Path):
    data = write(tmp_path / "d.jsonl", sums(12))
    recipe = SFTRecipe(learning_rate=2e-3, examples_per_step=4, micro_batch=2, epochs=2, seed=7)
    model, tokenizer = tiny_causal_lm("llama", seed=5)
    whole = train(model, tokenizer, [data], tmp_path / "whole", recipe, save_every=2)
    expected = weights(model)

    class Killed(Exception):
        pass

    def die_at_step_5(step) -> None:
        if step.step == 5:  # after the checkpoint of step 4, with step 5's metrics written
            raise Killed

    model, tokenizer = tiny_causal_lm("llama", seed=5)
    with pytest.raises(Killed):
        train(model, tokenizer, [data], tmp_path / "killed", recipe, save_every=2, progress=die_at_step_5)
    assert [m.step for m in read_metrics(tmp_path / "killed")] == [1, 2, 3, 4, 5]
    model, tokenizer = tiny_causal_lm("llama", seed=5)  # a new process starts from the base model again
    resumed = train(model, tokenizer, [data], tmp_path / "killed", recipe, save_every=2)
    assert resumed.finished and resumed.steps == whole.steps == 6
    assert [m.step for m in resumed.metrics] == list(range(1, 7))
    assert [m.loss for m in resumed.metrics] == pytest.approx([m.loss for m in whole.metrics], rel=1e-5)
    found = weights(model)
    moved = max(float((expected[n] - tiny_causal_lm("llama", seed=5)[0].state_dict()[n]).abs().max()) for n in ["lm_head.weight"])
    assert moved > 1e-3  # training changed the weights, so equality below means something
    for name, value in expected.items():
        torch.testing.assert_close(found[name], value, rtol=1e-5, atol=1e-6)


def test_a_run_folder_refuses_another_recipe(tmp_path: Path):
    data = write(tmp_path / "d.jsonl", sums(4))
    model, tokenizer = tiny_causal_lm("llama")
    train(model, tokenizer, [data], tmp_path / "out", SFTRecipe(examples_per_step=2, micro_batch=2), stop_at_step=1)
    with pytest.raises(ValueError, match="another recipe"):
        train(model, tokenizer, [data], tmp_path / "out", SFTRecipe(examples_per_step=4, micro_batch=2))


def test_the_sweep_ranks_early_and_finishes_the_ends(tmp_path: Path):
    from piscale.recipe import Indicators
    from piscale.sft.sweep import sweep

    data = write(tmp_path / "d.jsonl", sums(16))
    held_out = write(tmp_path / "v.jsonl", sums(4, start=40))
    base = SFTRecipe(micro_batch=2, epochs=1)
    report = sweep(lambda: tiny_causal_lm("llama", seed=1), [data], tmp_path / "sweep", base, [1e-3, 1e-2], [2, 4],
                   early_fraction=0.25, finish="ends", eval_data=[held_out])
    runs = report["runs"]
    assert set(runs) == {"lr0.001-b2", "lr0.001-b4", "lr0.01-b2", "lr0.01-b4"}
    assert runs["lr0.001-b2"]["steps"] == 8 and runs["lr0.001-b2"]["early_steps"] == 2
    assert runs["lr0.01-b4"]["steps"] == 4 and runs["lr0.01-b4"]["early_steps"] == 1
    early = {n: Indicators(**r["early"]) for n, r in runs.items()}
    assert report["early_ranking"] == rank_by_early_indicators(early)
    ends = {report["early_ranking"][0], report["early_ranking"][-1]}
    assert {n for n, r in runs.items() if r["finished"]} == ends
    for name in runs:  # the others stopped after their early steps, with a checkpoint to go on from
        steps = [m.step for m in read_metrics(tmp_path / "sweep" / name)]
        assert steps == list(range(1, (runs[name]["steps"] if name in ends else runs[name]["early_steps"]) + 1))
    assert sorted(report["final_ranking"]) == sorted(ends) and "agreement" in report
    assert all(runs[n]["final_score"] == runs[n]["eval_loss"] for n in ends)
    assert (tmp_path / "sweep" / "sweep.png").is_file()


# -- search outputs to SFT data ----------------------------------------------


def answer(problem: str, text: str, correct: bool = True, finished: bool = True, seed: int = 0) -> SearchedAnswer:
    return SearchedAnswer(problem_id=problem, system="Box it.", question=f"question {problem}", text=text,
                          correct=correct, finished=finished, algorithm="bon", budget=4, seed=seed, source="db:k")


def test_only_verified_finished_distinct_answers_are_kept():
    answers = [
        answer("p1", "A \\boxed{1}"),
        answer("p1", " A \\boxed{1}\n", seed=1),  # the same answer again (whitespace aside)
        answer("p1", "B \\boxed{1}", seed=2),
        answer("p1", "C \\boxed{2}", correct=False),
        answer("p2", "D \\boxed{3", finished=False),
        answer("p2", "A \\boxed{1}"),  # the same text as p1's is still new for p2
    ]
    records, left_out = sft_records(answers)
    assert [(r["problem_id"], r["completion"][0]["content"], r["seed"]) for r in records] == [
        ("p1", "A \\boxed{1}", 0), ("p1", "B \\boxed{1}", 2), ("p2", "A \\boxed{1}", 0)]
    assert left_out == {"a duplicate of a kept answer to the same problem": 1, "not verified correct": 1,
                        "cut off before its end": 1}
    assert records[0]["prompt"] == [{"role": "system", "content": "Box it."}, {"role": "user", "content": "question p1"}]
    one, left = sft_records(answers, per_problem=1)
    assert [r["problem_id"] for r in one] == ["p1", "p2"] and left["beyond 1 per problem"] == 1


def test_held_out_problems_keep_all_their_answers():
    records, _ = sft_records([answer(f"p{i}", f"text {j}") for i in range(10) for j in range(2)])
    training, held = split_by_problem(records, 0.2, seed=0)
    assert len(held) == 4 and len({r["problem_id"] for r in held}) == 2
    assert not {r["problem_id"] for r in held} & {r["problem_id"] for r in training}
    assert split_by_problem(records, 0.2, seed=0) == (training, held)


def test_sft_data_reads_rollouts_and_searches_from_a_results_database(tmp_path: Path):
    from typer.testing import CliRunner

    from piscale.cli import app
    from piscale.eval.store import ResultRow, ResultStore

    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.ensure_config("k1", "gsm8k_train", "m", "rollouts", {"collect": {}})
        run = store.start_run("k1", {})
        rollouts = [
            {"steps": ["1+1", " is \\boxed{2}"], "correct": True, "ended": True},
            {"steps": ["1+1 is \\boxed{2}"], "correct": True, "ended": True},  # the same text
            {"steps": ["\\boxed{3}"], "correct": False, "ended": True},
        ]
        result = {"question": "What is 1+1?", "system": "Box it.", "rollouts": rollouts}
        row = ResultRow("gsm8k_train-0", "rollouts", 3, 5, "2", "2", True, 2 / 3, False, 3, 1, 0.0, 0.0, 0.0, 0.0)
        store.save_search("k1", run, ("gsm8k_train-0", "rollouts", "", 3, 5), result, lambda _: [row])
        store.ensure_config("k2", "gsm8k_train", "m", "arith", {"system": "Sys."})
        run = store.start_run("k2", {})
        search = {"question": "What is 2+2?", "text": "\\boxed{4}", "chosen": 1,
                  "candidates": [{"text": "\\boxed{5}", "finished": True}, {"text": "\\boxed{4}", "finished": True}]}
        row = ResultRow("gsm8k_train-1", "pf", 4, 9, "4", "4", True, 1.0, False, 4, 1, 0.0, 0.0, 0.0, 0.0)
        store.save_search("k2", run, ("gsm8k_train-1", "pf", "", 4, 9), search, lambda _: [row])
        store.ensure_config("k3", "gsm8k", "m", "arith", {"system": "Sys."})  # a test set: never read
        run = store.start_run("k3", {})
        row = ResultRow("gsm8k-0", "pf", 4, 0, "4", "4", True, 1.0, False, 4, 1, 0.0, 0.0, 0.0, 0.0)
        store.save_search("k3", run, ("gsm8k-0", "pf", "", 4, 0), search, lambda _: [row])
    out = tmp_path / "sft.jsonl"
    done = CliRunner().invoke(app, ["sft", "data", "--db", str(db), "--out", str(out)])
    assert done.exit_code == 0, done.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["problem_id"], r["algorithm"], r["seed"], r["completion"][0]["content"]) for r in records] == [
        ("gsm8k_train-0", "rollouts", 5, "1+1 is \\boxed{2}"), ("gsm8k_train-1", "pf", 9, "\\boxed{4}")]
    assert records[1]["prompt"][0] == {"role": "system", "content": "Sys."}
    assert "1 not verified correct" in done.output and "1 a duplicate" in done.output
    refused = CliRunner().invoke(app, ["sft", "data", "--db", str(db), "--out", str(out), "--dataset", "gsm8k"])
    assert refused.exit_code == 2 and "evaluation set" in refused.output
    assert read_examples(out)[0].messages[-1] == {"role": "assistant", "content": "1+1 is \\boxed{2}"}


def test_sft_data_takes_the_first_problem_collections_only_when_asked(tmp_path: Path):
    from typer.testing import CliRunner

    from piscale.cli import app
    from piscale.eval.store import ResultRow, ResultStore

    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.ensure_config("k1", "gsm8k_train", "m", "rollouts", {"collect": {}})
        run = store.start_run("k1", {})
        for index in (3, 1, 2):  # stored in this order, which is the one --problems counts in
            problem = f"gsm8k_train-{index}"
            rollouts = [{"steps": [f"{index} is \\boxed{{{index}}}"], "correct": True, "ended": True}]
            result = {"question": f"What is {index}?", "system": "Box it.", "rollouts": rollouts}
            row = ResultRow(problem, "rollouts", 1, 0, str(index), str(index), True, 1.0, False, 1, 1, 0.0, 0.0, 0.0, 0.0)
            store.save_search("k1", run, (problem, "rollouts", "", 1, 0), result, lambda _, row=row: [row])
    out = tmp_path / "sft.jsonl"
    command = ["sft", "data", "--db", str(db), "--out", str(out)]
    done = CliRunner().invoke(app, [*command, "--problems", "2"])
    assert done.exit_code == 0, done.output
    assert [json.loads(line)["problem_id"] for line in out.read_text().splitlines()] == ["gsm8k_train-3", "gsm8k_train-1"]
    everything = CliRunner().invoke(app, command)
    assert everything.exit_code == 0 and len(out.read_text().splitlines()) == 3
    too_many = CliRunner().invoke(app, [*command, "--problems", "4"])
    assert too_many.exit_code == 2 and "holds 3 problem collections, fewer than the 4" in too_many.output


def test_the_cli_trains_resumes_and_reports(tmp_path: Path):
    from typer.testing import CliRunner

    from piscale.cli import app

    model, tokenizer = tiny_causal_lm("qwen2", seed=2)
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = write(tmp_path / "d.jsonl", sums(8))
    command = ["sft", "train", str(data), "--model", str(folder), "--out", str(tmp_path / "out"),
               "--examples-per-step", "4", "--micro-batch", "2", "--learning-rate", "1e-3", "--device", "cpu"]
    stopped = CliRunner().invoke(app, [*command, "--stop-at-step", "1"])
    assert stopped.exit_code == 0, stopped.output
    assert "stopped at step 1 of 2" in stopped.output
    finished = CliRunner().invoke(app, command)
    assert finished.exit_code == 0 and "finished at step 2 of 2" in finished.output
    assert [m.step for m in read_metrics(tmp_path / "out")] == [1, 2]
    again = CliRunner().invoke(app, command)
    assert again.exit_code == 0 and "nothing to do" in again.output
    other = CliRunner().invoke(app, [*command[:6], str(tmp_path), *command[7:]])  # a folder of other things
    assert other.exit_code == 2 and "holds no sft run" in other.output
    bad = CliRunner().invoke(app, [*command[:6], str(tmp_path / "new"), *command[7:], "--examples-per-step", "3"])
    assert bad.exit_code == 2 and "multiple of micro_batch" in bad.output
