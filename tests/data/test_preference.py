"""Preference data: formats preference (prompt/chosen/rejected) and unpaired (prompt/completion/label), as strings and
conversations (shared leading turns as the prompt), their errors, truncation of pairs, the cache, and collation.

The tokenizer fixture has pad id 0, bos id 2, eos id 3 (`</s>`), no chat template, and does
not add BOS by itself; tests that need BOS or a template set them on a copy. It tokenizes
"Name a colour." as 5 ids, "Blue is a colour." as 6, "the lazy dog" as 3, "Blue." as 4.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer

from qlora_lite.config import DataConfig
from qlora_lite.data import cache
from qlora_lite.data.batching import collate_batch, example_length
from qlora_lite.data.cache import format_truncation_stats, prepare_datasets
from qlora_lite.data.formats import FORMAT_NEEDS, IGNORE_INDEX, read_label, render_example, render_pair
from qlora_lite.data.tokenizing import tokenize_example, tokenize_records
from qlora_lite.errors import DataError
from tests.helpers import BOS, EOS, ids_of, save_llama3_style_tokenizer, write_jsonl

IGNORE = IGNORE_INDEX
USER = {"role": "user", "content": "Name a colour."}
BLUE = {"role": "assistant", "content": "Blue is a colour."}
DOG = {"role": "assistant", "content": "the lazy dog"}
STRING_PAIR = {"prompt": "Name a colour.", "chosen": "Blue is a colour.", "rejected": "the lazy dog"}
CHAT_PROMPT = "<|user|>\nName a colour.</s>\n<|assistant|>\n"  # DEFAULT_CHAT_TEMPLATE's rendering of USER, 23 ids


def pair(record: dict, tokenizer, max_seq_len: int = 512, index: int = 0) -> dict:
    return tokenize_example(record, "preference", tokenizer, max_seq_len=max_seq_len, index=index)


def chat(messages: list[dict], tokenizer) -> dict:
    return tokenize_example({"messages": messages}, "chat", tokenizer, max_seq_len=512)


# ----------------------------------------------------------------------------- strings


def test_a_string_pair_is_prompt_masked_then_each_answer_learned_with_eos(tokenizer):
    example = pair(STRING_PAIR, tokenizer)

    prompt, chosen, rejected = ids_of(tokenizer, "Name a colour."), ids_of(tokenizer, "Blue is a colour."), ids_of(tokenizer, "the lazy dog")
    assert (len(prompt), len(chosen), len(rejected)) == (5, 6, 3)
    assert list(example) == ["input_ids", "labels", "rejected_input_ids", "rejected_labels"]
    assert example["input_ids"] == prompt + chosen + [EOS]
    assert example["labels"] == [IGNORE] * 5 + chosen + [EOS]
    assert example["rejected_input_ids"] == prompt + rejected + [EOS]
    assert example["rejected_labels"] == [IGNORE] * 5 + rejected + [EOS]
    assert (len(example["input_ids"]), len(example["rejected_input_ids"])) == (12, 9)
    assert example["input_ids"][:5] == example["rejected_input_ids"][:5]
    # Evaluation and sample generation read input_ids/labels: the chosen answer is the reference.
    assert render_example(STRING_PAIR, "preference", tokenizer) == ("Name a colour.", "Blue is a colour.")


def test_a_string_pair_gets_the_bos_the_tokenizer_adds_masked_on_both_sides(tokenizer):
    bos_tokenizer = copy.deepcopy(tokenizer)
    bos_tokenizer.add_bos_token = True

    example = pair(STRING_PAIR, bos_tokenizer)

    prompt = ids_of(tokenizer, "Name a colour.")
    assert example["input_ids"][:6] == example["rejected_input_ids"][:6] == [BOS] + prompt
    assert example["labels"][:6] == example["rejected_labels"][:6] == [IGNORE] * 6
    assert example["input_ids"].count(BOS) == example["rejected_input_ids"].count(BOS) == 1
    assert example["labels"][-1] == example["rejected_labels"][-1] == EOS
    assert (len(example["input_ids"]), len(example["rejected_input_ids"])) == (13, 10)


# ----------------------------------------------------------------------------- conversations


@pytest.mark.parametrize("record", [
    {"prompt": [USER], "chosen": [BLUE], "rejected": [DOG]},
    {"prompt": "Name a colour.", "chosen": [USER, BLUE], "rejected": [USER, DOG]},
    {"chosen": [USER, BLUE], "rejected": [USER, DOG]},
    {"prompt": "Name a colour.", "chosen": [BLUE], "rejected": [DOG]},
    {"prompt": [USER], "chosen": "Blue is a colour.", "rejected": "the lazy dog"},
], ids=["explicit-prompt", "ultrafeedback-shared-turns", "shared-turns-no-prompt-field", "string-prompt-as-user-turn", "string-answers-as-assistant-turns"])
def test_a_conversational_pair_is_the_chat_rendering_of_prompt_and_each_answer(tokenizer, record):
    example = pair(record, tokenizer)

    prompt, chosen, rejected = ids_of(tokenizer, CHAT_PROMPT), ids_of(tokenizer, "Blue is a colour."), ids_of(tokenizer, "the lazy dog")
    assert len(prompt) == 23 and prompt.count(EOS) == 1  # the user turn's </s>, masked
    assert example["input_ids"] == prompt + chosen + [EOS]
    assert example["labels"] == [IGNORE] * 23 + chosen + [EOS]
    assert example["rejected_input_ids"] == prompt + rejected + [EOS]
    assert example["rejected_labels"] == [IGNORE] * 23 + rejected + [EOS]
    # Token for token what SFT's chat format trains on for the same conversation: one user turn, not two.
    assert {key: example[key] for key in ("input_ids", "labels")} == chat([USER, BLUE], tokenizer)
    assert {"input_ids": example["rejected_input_ids"], "labels": example["rejected_labels"]} == chat([USER, DOG], tokenizer)
    assert render_pair(record, tokenizer)[0] == [(CHAT_PROMPT, None), ("Blue is a colour.", "</s>")]


def test_a_multi_turn_prompt_is_masked_whole_and_only_the_final_answer_learned(tokenizer):
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
               {"role": "assistant", "content": "hi! how can I help?"}, USER]
    example = pair({"prompt": history, "chosen": [BLUE], "rejected": [DOG]}, tokenizer)

    sft = chat(history + [BLUE], tokenizer)
    assert example["input_ids"] == sft["input_ids"]  # the same tokens as chat's rendering
    n_masked = len(sft["input_ids"]) - 7
    assert n_masked == 74
    # chat learns the earlier assistant turn too; in a pair it is prompt.
    assert sum(label != IGNORE for label in sft["labels"]) == 7 + 7
    assert example["labels"] == [IGNORE] * 74 + ids_of(tokenizer, "Blue is a colour.") + [EOS]
    assert example["rejected_input_ids"][:74] == example["input_ids"][:74]
    assert example["rejected_labels"] == [IGNORE] * 74 + ids_of(tokenizer, "the lazy dog") + [EOS]


def test_role_aliases_and_sharegpt_turns_read_as_in_chat(tokenizer):
    record = {"chosen": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue is a colour."}],
              "rejected": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "the lazy dog"}]}

    [example] = tokenize_records([record], [0], "preference", tokenizer, "text")

    assert example["input_ids"] == pair({"chosen": [USER, BLUE], "rejected": [USER, DOG]}, tokenizer)["input_ids"]
    assert example["chat_read_as"] == 0b1110  # from/value, human->user, gpt->assistant (bits 1, 2, 3 of CHAT_READINGS)


def test_a_template_with_its_own_end_of_turn_token_closes_both_answers_with_it(tmp_path):
    eot = save_llama3_style_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))

    example = pair({"prompt": "Name a colour.", "chosen": [BLUE], "rejected": [DOG]}, tok)

    assert example["input_ids"] == chat([USER, BLUE], tok)["input_ids"]
    assert example["labels"][-1] == example["rejected_labels"][-1] == eot
    assert example["input_ids"][-1] == example["rejected_input_ids"][-1] == eot
    assert EOS not in example["input_ids"] + example["rejected_input_ids"]
    learned = [label for label in example["labels"] if label != IGNORE]
    assert learned == ids_of(tok, "Blue is a colour.") + [eot]
    n_prompt = len(example["input_ids"]) - len(learned)
    assert example["input_ids"][:n_prompt] == example["rejected_input_ids"][:n_prompt]
    assert example["labels"][:n_prompt] == example["rejected_labels"][:n_prompt] == [IGNORE] * n_prompt


# ----------------------------------------------------------------------------- unpaired


@pytest.mark.parametrize("label, desirable", [(True, 1), (False, 0), (1, 1), (0, 0)])
def test_unpaired_label_reads_as_desirable(tokenizer, label, desirable):
    example = tokenize_example({"prompt": "Name a colour.", "completion": "the lazy dog", "label": label}, "unpaired", tokenizer, max_seq_len=512)

    assert example == {
        "input_ids": ids_of(tokenizer, "Name a colour.") + ids_of(tokenizer, "the lazy dog") + [EOS],
        "labels": [IGNORE] * 5 + ids_of(tokenizer, "the lazy dog") + [EOS],
        "desirable": desirable,
    }
    assert read_label(label) is bool(desirable)


def test_unpaired_conversation_is_rendered_as_chat(tokenizer):
    example = tokenize_example({"prompt": [USER], "completion": [BLUE], "label": False}, "unpaired", tokenizer, max_seq_len=512)
    assert example == {**chat([USER, BLUE], tokenizer), "desirable": 0}
    assert example["labels"].count(IGNORE) == 23


# ----------------------------------------------------------------------------- bad records


PREFERENCE_NEEDS = FORMAT_NEEDS["preference"]
UNPAIRED_NEEDS = FORMAT_NEEDS["unpaired"]


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "rejected": "r"}, f"record 7 has no 'chosen' field ({PREFERENCE_NEEDS})"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, f"record 7 has no 'rejected' field ({PREFERENCE_NEEDS})"),
    ({"chosen": "c", "rejected": "r"}, f"record 7 has no 'prompt' field ({PREFERENCE_NEEDS})"),
    ({"chosen": [USER, BLUE], "rejected": [{"role": "user", "content": "hello there"}, DOG]}, f"record 7 has no 'prompt' field ({PREFERENCE_NEEDS})"),
    ({"prompt": "p", "chosen": "  ", "rejected": "r"}, f"record 7 has an empty 'chosen' field ({PREFERENCE_NEEDS})"),
    ({"prompt": "p", "chosen": "c", "rejected": []}, f"record 7 has an empty 'rejected' field ({PREFERENCE_NEEDS})"),
    ({"prompt": "", "chosen": "c", "rejected": "r"}, f"record 7 has an empty 'prompt' field ({PREFERENCE_NEEDS})"),
    ({"prompt": [USER], "chosen": [BLUE], "rejected": [{"role": "assistant", "content": " "}]},
     f"record 7 has an empty 'rejected' field: its last message has no text ({PREFERENCE_NEEDS})"),
    ({"prompt": "p", "chosen": 42, "rejected": "r"},
     f"record 7 has a 'chosen' field of type int, not a string or a conversation (a list of {{role, content}}) ({PREFERENCE_NEEDS})"),
    ({"prompt": "p", "chosen": "c", "rejected": BLUE},
     f"record 7 has a 'rejected' field of type dict, not a string or a conversation (a list of {{role, content}}) ({PREFERENCE_NEEDS})"),
    ({"prompt": "p", "chosen": [BLUE, USER], "rejected": [DOG]},
     f"record 7: the last message of 'chosen' has role 'user', but an answer must end with the assistant's turn ({PREFERENCE_NEEDS}); "
     "rename that turn to 'assistant' if it is the answer"),
    ({"prompt": "p", "chosen": [{"role": "narrator", "content": "c"}], "rejected": [DOG]},
     "record 7 'chosen' has chat roles ['narrator']; qlora-lite reads system, user, assistant (and human, gpt, bot, model as their aliases): rename the others"),
    ({"prompt": [{"speaker": "user", "text": "p"}], "chosen": [BLUE], "rejected": [DOG]},
     f"record 7 'prompt' message 0 is not a {{role, content}} mapping ({PREFERENCE_NEEDS}); write each turn as {{role, content}} (or ShareGPT's {{from, value}})"),
], ids=["no-chosen", "null-rejected", "no-prompt", "no-prompt-no-shared-turns", "blank-chosen", "empty-rejected-list", "empty-prompt",
        "blank-last-turn", "number-answer", "mapping-answer", "answer-ends-with-user", "unknown-role", "bad-prompt-turn"])
def test_a_bad_preference_record_is_one_line_naming_the_record_and_the_field(tokenizer, record, message):
    with pytest.raises(DataError) as err:
        pair(record, tokenizer, index=7)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("record", [
    {"prompt": "Name a colour.", "chosen": "Blue is a colour.", "rejected": "Blue is a colour."},
    # Identical once rendered: a string answer is an assistant turn beside a conversation.
    {"prompt": "Name a colour.", "chosen": "Blue is a colour.", "rejected": [BLUE]},
    {"chosen": [USER, BLUE], "rejected": [USER, BLUE]},
], ids=["same-strings", "same-after-rendering", "same-conversations"])
def test_identical_answers_are_refused(tokenizer, record):
    with pytest.raises(DataError) as err:
        pair(record, tokenizer, index=7)
    assert str(err.value) == (
        f"record 7: 'chosen' and 'rejected' give the same tokens, so there is nothing to prefer ({PREFERENCE_NEEDS}); fix one answer or drop the record"
    )


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "completion": "c"}, f"record 7 has no 'label' field ({UNPAIRED_NEEDS})"),
    ({"prompt": "p", "completion": "c", "label": "true"}, f"record 7 has a 'label' of 'true', not true or false (nor 1 or 0) ({UNPAIRED_NEEDS})"),
    ({"prompt": "p", "completion": "c", "label": 2}, f"record 7 has a 'label' of 2, not true or false (nor 1 or 0) ({UNPAIRED_NEEDS})"),
    ({"prompt": "p", "completion": "c", "label": 1.0}, f"record 7 has a 'label' of 1.0, not true or false (nor 1 or 0) ({UNPAIRED_NEEDS})"),
    ({"prompt": "p", "label": True}, f"record 7 has no 'completion' field ({UNPAIRED_NEEDS})"),
    ({"completion": "c", "label": True}, f"record 7 has no 'prompt' field ({UNPAIRED_NEEDS})"),
    ({"prompt": "p", "completion": " ", "label": True}, f"record 7 has an empty 'completion' field ({UNPAIRED_NEEDS})"),
], ids=["no-label", "string-label", "label-2", "float-label", "no-completion", "no-prompt", "blank-completion"])
def test_a_bad_unpaired_record_is_one_line_naming_the_record_and_the_field(tokenizer, record, message):
    with pytest.raises(DataError) as err:
        tokenize_example(record, "unpaired", tokenizer, max_seq_len=512, index=7)
    assert str(err.value) == message


# ----------------------------------------------------------------------------- truncation and the cache


LONG = "the quick brown fox jumps over the lazy dog"  # 9 ids
TRUNCATION_RECORDS = [
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "the lazy dog"},  # 10 and 9 tokens: fits
    {"prompt": "Name a colour.", "chosen": LONG, "rejected": "Blue."},  # 15 and 10: chosen loses 3 learned tokens
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": LONG},  # 10 and 15: rejected loses 3
    {"prompt": "the quick brown fox jumps over the lazy dog. Name a colour.", "chosen": "Blue.", "rejected": "the lazy dog"},  # 20 and 19: prompt alone is 15
    {"prompt": "hello there", "chosen": "Blue is a colour.", "rejected": "the lazy dog"},  # 9 and 6: fits
]


def test_whole_lengths_of_the_truncation_records(tokenizer):
    whole = [pair(record, tokenizer) for record in TRUNCATION_RECORDS]
    assert [(len(ex["input_ids"]), len(ex["rejected_input_ids"])) for ex in whole] == [(10, 9), (15, 10), (10, 15), (20, 19), (9, 6)]


@pytest.mark.parametrize("policy, kept, dropped, tokens, lengths, action", [
    ("drop", [0, 4], 3, 19 + 15, [10, 9], "dropped them"),
    ("keep", [0, 1, 2, 4], 1, 19 + 22 + 22 + 15, [10, 12, 12, 9],
     "kept 2 with a cut response and no EOS, dropped 1 with no response token left"),
])
def test_a_pair_is_dropped_or_kept_whole_by_its_longer_answer(tmp_path, tokenizer, capsys, policy, kept, dropped, tokens, lengths, action):
    path = write_jsonl(tmp_path / "pairs.jsonl", TRUNCATION_RECORDS)

    prepared = prepare_datasets(DataConfig(path=str(path), format="preference", truncation=policy), tokenizer, max_seq_len=12, seed=0)

    stats = prepared.truncation["train"]
    assert (stats.examples, stats.truncated, stats.fully_cut, stats.dropped) == (5, 3, 1, dropped)
    assert stats.response_tokens_cut == 3 + 3 + (5 + 4)  # both answers of the pair whose prompt fills max_seq_len
    assert stats.longest_tokens == 20
    assert (prepared.stats["kept"], prepared.stats["tokens"]) == (len(kept), tokens)  # tokens of both sequences
    assert prepared.train.lengths.tolist() == lengths  # the longer sequence of each pair
    expected = [pair(TRUNCATION_RECORDS[i], tokenizer, max_seq_len=12) for i in kept]
    assert list(prepared.train) == expected
    assert all(max(len(ex["input_ids"]), len(ex["rejected_input_ids"])) <= 12 for ex in prepared.train)
    line = (
        f"train: 3 of 5 examples did not fit in max_seq_len=12 (15 response tokens cut, longest example 20 tokens); {action} (data.truncation={policy})"
    )
    assert format_truncation_stats(stats) == line
    assert line in capsys.readouterr().out


def test_the_cache_returns_the_same_pairs_and_holds_them_out_for_eval(tmp_path, tokenizer):
    fox = {"role": "assistant", "content": "the quick fox"}
    records = [{"prompt": f"Name colour {i}.", "chosen": [BLUE], "rejected": [DOG if i % 2 else fox]} for i in range(10)]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    cfg = DataConfig(path=str(path), format="preference", eval_fraction=0.2)

    first = prepare_datasets(cfg, tokenizer, max_seq_len=512, seed=0)
    second = prepare_datasets(cfg, tokenizer, max_seq_len=512, seed=0)

    assert (first.stats["cache"], second.stats["cache"]) == ("miss", "hit")
    assert (len(first.train), len(first.eval)) == (8, 2)
    assert list(first.train) == list(second.train) and list(first.eval) == list(second.eval)
    expected = {tuple(pair(r, tokenizer)["input_ids"]): pair(r, tokenizer) for r in records}
    for ex in list(second.train) + list(second.eval):
        assert ex == expected[tuple(ex["input_ids"])]
        assert list(ex) == ["input_ids", "labels", "rejected_input_ids", "rejected_labels"]
    assert second.train.lengths.tolist() == [example_length(ex) for ex in second.train]
    assert second.stats["tokens"] == sum(len(ex["input_ids"]) + len(ex["rejected_input_ids"]) for ex in list(second.train) + list(second.eval))


def test_unpaired_examples_come_out_of_the_cache_with_desirable(tmp_path, tokenizer):
    records = [{"prompt": "Name a colour.", "completion": "Blue." if i % 3 else "the lazy dog", "label": bool(i % 3)} for i in range(6)]
    path = write_jsonl(tmp_path / "kto.jsonl", records)
    cfg = DataConfig(path=str(path), format="unpaired")

    prepared = prepare_datasets(cfg, tokenizer, max_seq_len=512, seed=0)
    again = prepare_datasets(cfg, tokenizer, max_seq_len=512, seed=0)

    assert again.stats["cache"] == "hit"
    assert [ex["desirable"] for ex in again.train] == [0, 1, 1, 0, 1, 1]
    assert list(again.train) == list(prepared.train) == [tokenize_example(r, "unpaired", tokenizer, max_seq_len=512) for r in records]
    assert prepared.stats["tokens"] == 4 * 10 + 2 * 9


def test_other_formats_keep_their_cache_rows_and_pairs_are_never_packed(tmp_path, tokenizer):
    assert cache._prepared_features("alpaca") == cache._PREPARED_FEATURES
    assert list(cache._prepared_features("preference"))[-3:] == ["rejected_input_ids", "rejected_labels", "tokens"]
    path = write_jsonl(tmp_path / "pairs.jsonl", [STRING_PAIR])
    with pytest.raises(DataError, match="set data.packing: false"):
        prepare_datasets(DataConfig(path=str(path), format="preference", packing=True), tokenizer, max_seq_len=512, seed=0)


def test_a_bad_pair_in_a_file_names_the_file_and_row(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [STRING_PAIR, {**STRING_PAIR, "rejected": STRING_PAIR["chosen"]}])
    with pytest.raises(DataError) as err:
        prepare_datasets(DataConfig(path=str(path), format="preference"), tokenizer, max_seq_len=512, seed=0)
    assert str(err.value).startswith(f"train file {path}, record 1: 'chosen' and 'rejected' give the same tokens")


# ----------------------------------------------------------------------------- collation


def test_pairs_collate_into_chosen_rows_then_rejected_rows(tokenizer):
    examples = [pair(STRING_PAIR, tokenizer), pair({"prompt": "hello there", "chosen": "Blue.", "rejected": LONG}, tokenizer)]
    examples[0]["ref_chosen_logps"], examples[0]["ref_rejected_logps"] = -1.5, -2.25
    examples[1]["ref_chosen_logps"], examples[1]["ref_rejected_logps"] = -3.0, -0.5

    batch = collate_batch(examples, pad_token_id=0)

    assert set(batch) == {"input_ids", "labels", "attention_mask", "ref_chosen_logps", "ref_rejected_logps"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (4, 12)  # 2B rows, T the longest of all
    rows = [ex["input_ids"] for ex in examples] + [ex["rejected_input_ids"] for ex in examples]
    assert [len(row) for row in rows] == [12, 7, 9, 12]
    for i, row in enumerate(rows):
        assert batch["input_ids"][i, : len(row)].tolist() == row
        assert batch["input_ids"][i, len(row) :].tolist() == [0] * (12 - len(row))
        assert batch["attention_mask"][i].tolist() == [1] * len(row) + [0] * (12 - len(row))
    assert batch["labels"][2].tolist() == examples[0]["rejected_labels"] + [IGNORE] * 3
    assert batch["labels"][1].tolist() == examples[1]["labels"] + [IGNORE] * 5
    assert batch["ref_chosen_logps"].dtype == torch.float32
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -3.0] and batch["ref_rejected_logps"].tolist() == [-2.25, -0.5]


def test_unpaired_collate_with_desirable_and_kl_rows(tokenizer):
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "desirable": 1, "kl_input_ids": [5, 8], "kl_labels": [IGNORE, 8], "ref_logps": -1.0},
        {"input_ids": [5, 9], "labels": [IGNORE, 9], "desirable": 0, "kl_input_ids": [5, 6, 7, 8], "kl_labels": [IGNORE, 6, 7, 8], "ref_logps": -2.0},
    ]

    batch = collate_batch(examples, pad_token_id=0)

    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, 9, IGNORE]]
    assert batch["desirable"].dtype == torch.bool and batch["desirable"].tolist() == [True, False]
    assert batch["kl_input_ids"].tolist() == [[5, 8, 0, 0], [5, 6, 7, 8]]
    assert batch["kl_labels"].tolist() == [[IGNORE, 8, IGNORE, IGNORE], [IGNORE, 6, 7, 8]]
    assert batch["kl_attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["ref_logps"].dtype == torch.float32 and batch["ref_logps"].tolist() == [-1.0, -2.0]
    assert batch["input_ids"].dtype == batch["kl_input_ids"].dtype == torch.long


@pytest.mark.parametrize("key", ["rejected_input_ids", "desirable", "kl_input_ids", "ref_logps"])
def test_examples_with_and_without_a_key_do_not_collate(key):
    values = {"rejected_input_ids": [1], "desirable": 1, "kl_input_ids": [1], "ref_logps": 0.0}
    with_key = {"input_ids": [1, 2], "labels": [1, 2], key: values[key]}
    if key == "rejected_input_ids":
        with_key["rejected_labels"] = [1]
    if key == "kl_input_ids":
        with_key["kl_labels"] = [1]
    with pytest.raises(ValueError, match=f"cannot collate examples with and without '{key}' into one batch"):
        collate_batch([with_key, {"input_ids": [1], "labels": [1]}], pad_token_id=0)


def test_a_pair_is_as_long_as_its_longer_sequence():
    assert example_length({"input_ids": [1, 2], "rejected_input_ids": [1, 2, 3, 4]}) == 4
    assert example_length({"input_ids": [1, 2, 3]}) == 3
