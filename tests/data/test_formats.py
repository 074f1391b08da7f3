"""Formats and masking: alpaca, chat (default, Llama-3 and ChatML templates, multi-turn; roles, their aliases, ShareGPT) and text; BOS, EOS and the end of turn; bad records.

The tokenizer fixture has pad id 0, bos id 2, eos id 3 (`</s>`), no chat template, and does
not add BOS by itself; tests that need BOS or a template set them on a copy.
"""

from __future__ import annotations

import copy

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from qlora_lite.data.formats import FORMAT_NEEDS, IGNORE_INDEX, find_end_of_turn_token, render_example
from qlora_lite.data.records import load_records
from qlora_lite.data.tokenizing import tokenize_example
from qlora_lite.errors import DataError
from tests.helpers import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, BOS, CHATML_TEMPLATE, EOS, SINGLE_TURN, ids_of, write_csv

# ----------------------------------------------------------------------------- formats and masking


def test_alpaca_prompt_is_the_standard_template_and_only_response_is_learned(tokenizer):
    record = {"instruction": "Name a colour.", "input": "the sky", "output": "Blue is a colour."}

    prompt, response = render_example(record, "alpaca", tokenizer)
    example = tokenize_example(record, "alpaca", tokenizer, max_seq_len=512)

    assert (prompt, response) == (ALPACA_WITH_INPUT, "Blue is a colour.")
    n_prompt, response_ids = len(ids_of(tokenizer, prompt)), ids_of(tokenizer, response)
    assert len(example["input_ids"]) == n_prompt + len(response_ids) + 1
    assert example["labels"].count(IGNORE_INDEX) == n_prompt
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == response_ids + [EOS]
    assert example["input_ids"][-1] == EOS and example["labels"][-1] == EOS


@pytest.mark.parametrize("record", [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Name a colour.", "input": None, "output": "Blue."},
], ids=["missing", "empty", "null"])
def test_alpaca_without_input_uses_the_no_input_template(tokenizer, record):
    assert render_example(record, "alpaca", tokenizer) == (ALPACA_NO_INPUT, "Blue.")


def test_alpaca_csv_empty_input_cell_uses_the_no_input_template(tmp_path, tokenizer):
    path = write_csv(tmp_path / "d.csv", [{"instruction": "Name a colour.", "input": "", "output": "42"}])
    record = load_records(str(path))[0]
    # An empty CSV cell arrives as None and a numeric answer as an int: both must render.
    assert render_example(record, "alpaca", tokenizer) == (ALPACA_NO_INPUT, "42")


def test_bos_is_prepended_and_masked_when_the_tokenizer_adds_one(tokenizer):
    bos_tokenizer = copy.deepcopy(tokenizer)
    bos_tokenizer.add_bos_token = True
    record = {"instruction": "Name a colour.", "output": "Blue."}

    example = tokenize_example(record, "alpaca", bos_tokenizer, max_seq_len=512)

    n_prompt = len(ids_of(tokenizer, ALPACA_NO_INPUT))
    assert example["input_ids"][0] == BOS and example["input_ids"].count(BOS) == 1
    assert example["labels"].count(IGNORE_INDEX) == 1 + n_prompt
    assert example["labels"][-1] == EOS


def test_text_format_learns_every_token(tokenizer):
    record = {"body": "the quick brown fox jumps over the lazy dog"}

    prompt, response = render_example(record, "text", tokenizer, text_field="body")
    example = tokenize_example(record, "text", tokenizer, max_seq_len=512, text_field="body")

    assert prompt == "" and response == record["body"]
    assert example["input_ids"] == ids_of(tokenizer, record["body"]) + [EOS]
    assert example["labels"] == example["input_ids"]
    assert example["labels"].count(IGNORE_INDEX) == 0


def test_chat_without_template_uses_the_default_template(tokenizer):
    assert tokenizer.chat_template is None

    prompt, response = render_example(SINGLE_TURN, "chat", tokenizer)
    example = tokenize_example(SINGLE_TURN, "chat", tokenizer, max_seq_len=512)

    assert prompt == "<|user|>\nName a colour.</s>\n<|assistant|>\n"
    assert response == "Blue is a colour."
    n_prompt = len(ids_of(tokenizer, prompt))
    assert example["labels"].count(IGNORE_INDEX) == n_prompt
    assert example["input_ids"] == ids_of(tokenizer, prompt) + ids_of(tokenizer, response) + [EOS]
    assert example["labels"][-1] == EOS


def test_chat_uses_the_tokenizer_template_without_doubling_bos_or_eos(tokenizer):
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = CHATML_TEMPLATE
    chat_tokenizer.add_bos_token = True  # the template writes BOS too: it must appear once

    prompt, response = render_example(SINGLE_TURN, "chat", chat_tokenizer)
    example = tokenize_example(SINGLE_TURN, "chat", chat_tokenizer, max_seq_len=512)

    assert prompt == "<s><|im_start|>user\nName a colour.</s>\n<|im_start|>assistant\n"
    assert response == "Blue is a colour."  # the template's closing </s> becomes the appended EOS
    n_prompt = len(ids_of(tokenizer, prompt))
    assert example["input_ids"][0] == BOS and example["input_ids"].count(BOS) == 1
    assert example["labels"].count(IGNORE_INDEX) == n_prompt
    assert example["labels"][n_prompt:] == ids_of(tokenizer, "Blue is a colour.") + [EOS]
    assert example["input_ids"].count(EOS) == 2  # one closing the user turn (masked), one learned


def test_multi_turn_chat_learns_every_assistant_turn_and_nothing_else(tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi! how can I help?"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue is a colour."},
    ]}

    prompt, response = render_example(record, "chat", tokenizer)
    example = tokenize_example(record, "chat", tokenizer, max_seq_len=512)

    first = "<|system|>\nBe brief.</s>\n<|user|>\nhello there</s>\n<|assistant|>\n"
    between = "\n<|user|>\nName a colour.</s>\n<|assistant|>\n"
    assert prompt == first + "hi! how can I help?</s>" + between
    assert response == "Blue is a colour."
    t1, t2 = ids_of(tokenizer, "hi! how can I help?"), ids_of(tokenizer, "Blue is a colour.")
    m1, m2 = ids_of(tokenizer, first), ids_of(tokenizer, between)
    assert example["input_ids"] == m1 + t1 + [EOS] + m2 + t2 + [EOS]
    assert example["labels"] == [IGNORE_INDEX] * len(m1) + t1 + [EOS] + [IGNORE_INDEX] * len(m2) + t2 + [EOS]


# Meta-Llama-3-8B-Instruct's chat template, verbatim; Llama-3.1 closes turns the same way.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5's ChatML template less its tool branches.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]  # ids 0..4
QWEN25_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0..2
TWO_TURNS = {"messages": [
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi! how can I help?"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue is a colour."},
]}


def build_byte_level_tokenizer(special: list[str], template: str, eos: str, bos: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer like Llama 3's and Qwen2's (decode gives back the exact text); adds BOS when given one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["hello there hi! how can I help? Name a colour. Blue is a colour. You are a helpful assistant."] * 5, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, special.index(bos))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)
    hf_tok.chat_template = template
    return hf_tok


def llama3_tokenizer(eos: str = "<|end_of_text|>") -> PreTrainedTokenizerFast:
    """Llama-3.1 base (eos <|end_of_text|>) by default; eos <|eot_id|> is the instruct tokenizer."""
    return build_byte_level_tokenizer(LLAMA3_SPECIAL, LLAMA3_TEMPLATE, eos=eos, bos="<|begin_of_text|>")


def qwen25_tokenizer(eos: str = "<|endoftext|>") -> PreTrainedTokenizerFast:
    """Qwen2.5 base (eos <|endoftext|>, no BOS) by default; eos <|im_end|> is the instruct tokenizer."""
    return build_byte_level_tokenizer(QWEN25_SPECIAL, QWEN25_TEMPLATE, eos=eos)


def test_find_end_of_turn_token_reads_the_template():
    assert find_end_of_turn_token(llama3_tokenizer()) == "<|eot_id|>"
    assert find_end_of_turn_token(qwen25_tokenizer()) == "<|im_end|>"
    assert find_end_of_turn_token(llama3_tokenizer(eos="<|eot_id|>")) == "<|eot_id|>"


def test_find_end_of_turn_token_of_our_fixture_tokenizer(tokenizer):
    assert find_end_of_turn_token(tokenizer) is None  # no template: DEFAULT_CHAT_TEMPLATE ends turns with EOS
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = CHATML_TEMPLATE
    assert find_end_of_turn_token(chat_tokenizer) == "</s>"
    chat_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | trim + ' ' + eos_token }}{% endfor %}"
    assert find_end_of_turn_token(chat_tokenizer) == "</s>"  # Llama 2 writes a space before it
    chat_tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}\n{% endfor %}"
    assert find_end_of_turn_token(chat_tokenizer) is None


@pytest.mark.parametrize("eos", ["<|end_of_text|>", "<|eot_id|>"], ids=["base", "instruct"])
def test_llama3_chat_ends_each_turn_with_eot_and_no_extra_eos(eos):
    tok = llama3_tokenizer(eos)
    eot, bos = 4, 0
    assert (tok.convert_tokens_to_ids("<|eot_id|>"), tok.bos_token_id) == (eot, bos)

    prompt, response = render_example(TWO_TURNS, "chat", tok)
    example = tokenize_example(TWO_TURNS, "chat", tok, max_seq_len=512)

    first = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    between = "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert prompt == first + "hi! how can I help?<|eot_id|>" + between
    assert prompt == tok.apply_chat_template(TWO_TURNS["messages"][:3], add_generation_prompt=True, tokenize=False)
    assert response == "Blue is a colour."
    m1, m2 = ids_of(tok, first), ids_of(tok, between)
    t1, t2 = ids_of(tok, "hi! how can I help?"), ids_of(tok, "Blue is a colour.")
    assert m1[0] == bos and m1.count(eot) == 1 and m2.count(eot) == 1  # the user turns' <|eot_id|>, masked
    assert example["input_ids"] == m1 + t1 + [eot] + m2 + t2 + [eot]
    assert example["labels"] == [IGNORE_INDEX] * len(m1) + t1 + [eot] + [IGNORE_INDEX] * len(m2) + t2 + [eot]
    assert example["input_ids"].count(bos) == 1 and 1 not in example["input_ids"]  # no <|end_of_text|> anywhere
    # The training sequence is the template's own rendering (which ends right after <|eot_id|>).
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(TWO_TURNS["messages"], tokenize=False)


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<|im_end|>"], ids=["base", "instruct"])
def test_chatml_chat_ends_each_turn_with_im_end_and_no_extra_eos(eos):
    tok = qwen25_tokenizer(eos)
    im_end, endoftext = 2, 0
    assert tok.convert_tokens_to_ids("<|im_end|>") == im_end and tok.bos_token_id is None

    prompt, response = render_example(TWO_TURNS, "chat", tok)
    example = tokenize_example(TWO_TURNS, "chat", tok, max_seq_len=512)

    first = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    )
    between = "\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert prompt == first + "hi! how can I help?<|im_end|>" + between
    assert prompt == tok.apply_chat_template(TWO_TURNS["messages"][:3], add_generation_prompt=True, tokenize=False)
    assert response == "Blue is a colour."
    m1, m2 = ids_of(tok, first), ids_of(tok, between)
    t1, t2 = ids_of(tok, "hi! how can I help?"), ids_of(tok, "Blue is a colour.")
    assert m1.count(im_end) == 2 and m2.count(im_end) == 1  # system and user turns' <|im_end|>, masked
    assert example["input_ids"] == m1 + t1 + [im_end] + m2 + t2 + [im_end]
    assert example["labels"] == [IGNORE_INDEX] * len(m1) + t1 + [im_end] + [IGNORE_INDEX] * len(m2) + t2 + [im_end]
    assert endoftext not in example["input_ids"]
    # The template's rendering, less the "\n" it writes after the last turn.
    assert tok.decode(example["input_ids"]) + "\n" == tok.apply_chat_template(TWO_TURNS["messages"], tokenize=False)


@pytest.mark.parametrize("fmt, record, field", [
    ("alpaca", {"instruction": "Name a colour.", "input": ""}, "output"),
    ("alpaca", {"instruction": "  ", "output": "Blue."}, "instruction"),
    ("chat", {"text": "hello"}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "assistant"),
    ("chat", {"messages": [{"speaker": "human", "text": "hi"}]}, "role, content"),
    ("text", {"body": "hello"}, "text"),
], ids=["alpaca-no-output", "alpaca-blank-instruction", "chat-no-messages", "chat-ends-with-user", "chat-unknown-keys", "text-no-field"])
def test_bad_record_error_names_the_field_and_the_index(tokenizer, fmt, record, field):
    with pytest.raises(DataError) as err:
        tokenize_example(record, fmt, tokenizer, max_seq_len=512, index=17)
    assert "record 17" in str(err.value)
    assert field in str(err.value)


def test_missing_output_message_is_exact(tokenizer):
    with pytest.raises(DataError) as err:
        render_example({"instruction": "Name a colour."}, "alpaca", tokenizer, index=17)
    assert str(err.value) == "record 17 has no 'output' field (format alpaca needs instruction, output; input optional)"


# ----------------------------------------------------------------------------- chat roles


def conversation(roles: list[str], contents: list[str] | None = None, keys: tuple[str, str] = ("role", "content"), field: str = "messages") -> dict:
    """A chat record with these roles (and TWO_TURNS' contents, in turn), written with these keys."""
    contents = contents or [m["content"] for m in TWO_TURNS["messages"]]
    return {field: [{keys[0]: role, keys[1]: content} for role, content in zip(roles, contents)]}


def learned_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([label for label in example["labels"] if label != IGNORE_INDEX])


@pytest.mark.parametrize("roles", [
    ["user", "bot", "user", "assistant"],
    ["human", "gpt", "human", "gpt"],
    ["user", "model", "user", "model"],
], ids=["bot", "human-gpt", "model"])
def test_chat_role_aliases_are_read_as_the_roles_the_template_knows(tokenizer, roles):
    """Issue 22: `human` rendered as <|human|> (generate writes <|user|>), and a middle `bot` turn was masked, not learned."""
    record = conversation(roles)

    prompt, _ = render_example(record, "chat", tokenizer)
    example = tokenize_example(record, "chat", tokenizer, max_seq_len=512)

    assert prompt.startswith("<|user|>\nhello there</s>\n<|assistant|>\nhi! how can I help?</s>\n<|user|>\n")
    assert example == tokenize_example(TWO_TURNS, "chat", tokenizer, max_seq_len=512)
    assert learned_text(tokenizer, example) == "hi! how can I help?</s> Blue is a colour.</s>"  # the decoder writes a space after </s>


@pytest.mark.parametrize("field", ["conversations", "messages"])
def test_sharegpt_turns_are_read_as_messages(tokenizer, field):
    record = conversation(["system", "human", "gpt"], ["Be brief.", "Name a colour.", "Blue is a colour."], keys=("from", "value"), field=field)
    same = conversation(["system", "user", "assistant"], ["Be brief.", "Name a colour.", "Blue is a colour."])

    assert render_example(record, "chat", tokenizer) == ("<|system|>\nBe brief.</s>\n<|user|>\nName a colour.</s>\n<|assistant|>\n", "Blue is a colour.")
    assert tokenize_example(record, "chat", tokenizer, max_seq_len=512) == tokenize_example(same, "chat", tokenizer, max_seq_len=512)


# A template that handles tool results (as Llama 3.1's, Qwen2.5's and Mistral's do): role tool is read too.
TOOL_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'tool' %}<|im_start|>tool result\n{% else %}<|im_start|>{{ m['role'] }}\n{% endif %}"
    "{{ m['content'] + eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLES_READ = "qlora-lite reads system, user, assistant (and human, gpt, bot, model as their aliases): rename the others"


@pytest.mark.parametrize("roles, template, message", [
    (["user", "narrator", "user", "assistant"], None, "record 7 has chat roles ['user', 'narrator', 'assistant']; " + ROLES_READ),
    (["User", "Assistant"], None, "record 7 has chat roles ['User', 'Assistant']; " + ROLES_READ),
    (["user", "assistant", "tool", "assistant"], None, "record 7 has chat roles ['user', 'assistant', 'tool']; " + ROLES_READ),
    (["human", "narrator"], None, "record 7 has chat roles ['human', 'narrator']; " + ROLES_READ),
    (["user", "narrator", "assistant"], TOOL_TEMPLATE, (
        "record 7 has chat roles ['user', 'narrator', 'assistant']; "
        "qlora-lite reads system, user, assistant, tool (and human, gpt, bot, model as their aliases): rename the others"
    )),
], ids=["unknown-middle", "capitalised", "tool-without-a-tool-template", "unknown-last", "unknown-with-a-tool-template"])
def test_unknown_chat_roles_are_refused_with_the_record_and_the_roles_found(tokenizer, roles, template, message):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    with pytest.raises(DataError) as err:
        tokenize_example(conversation(roles), "chat", tok, max_seq_len=512, index=7)
    assert str(err.value) == message


def test_a_template_that_handles_tool_results_reads_tool_turns_masked(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    record = conversation(["user", "assistant", "tool", "assistant"])

    prompt, response = render_example(record, "chat", tok)
    example = tokenize_example(record, "chat", tok, max_seq_len=512)

    assert prompt.endswith("hi! how can I help?</s>\n<|im_start|>tool result\nName a colour.</s>\n<|im_start|>assistant\n")
    assert response == "Blue is a colour."
    assert learned_text(tok, example) == "hi! how can I help?</s> Blue is a colour.</s>"


@pytest.mark.parametrize("roles", [["user", "assistant", "user"], ["user", "assistant", "system"], ["human", "gpt", "human"]])
def test_a_record_that_does_not_end_with_the_answer_says_to_rename_or_drop_the_last_turn(tokenizer, roles):
    with pytest.raises(DataError) as err:
        tokenize_example(conversation(roles), "chat", tokenizer, max_seq_len=512, index=7)
    assert str(err.value) == (
        f"record 7: the last message has role {roles[-1]!r}, but a record must end with the assistant's answer ({FORMAT_NEEDS['chat']}); "
        "rename that turn to 'assistant' if it is the answer, else drop it"
    )


def test_a_last_turn_with_an_alias_of_assistant_is_learned(tokenizer):
    # Before: "record 7: the last message has role 'bot', not 'assistant' (...); drop trailing user turns".
    example = tokenize_example(conversation(["user", "bot"], ["Name a colour.", "Blue is a colour."]), "chat", tokenizer, max_seq_len=512, index=7)
    assert example == tokenize_example(SINGLE_TURN, "chat", tokenizer, max_seq_len=512)


@pytest.mark.parametrize("record, message", [
    ({"text": "hello"}, "record 7 has no 'messages' field (nor ShareGPT's 'conversations') ({needs})"),
    ({"messages": [{"speaker": "human", "text": "hi"}]},
     "record 7 message 0 is not a {{role, content}} mapping ({needs}); write each turn as {{role, content}} (or ShareGPT's {{from, value}})"),
    ({"conversations": [{"from": "human", "value": None}]}, "record 7 message 0 has no text in its 'value' field ({needs})"),
], ids=["no-messages", "unknown-keys", "no-value"])
def test_a_malformed_chat_record_says_what_it_lacks(tokenizer, record, message):
    with pytest.raises(DataError) as err:
        tokenize_example(record, "chat", tokenizer, max_seq_len=512, index=7)
    assert str(err.value) == message.format(needs=FORMAT_NEEDS["chat"])


def test_truncation_keeps_the_first_max_seq_len_tokens(tokenizer):
    record = {"instruction": "Name a colour.", "output": "the quick brown fox jumps over the lazy dog"}
    full = tokenize_example(record, "alpaca", tokenizer, max_seq_len=512)
    n_prompt = len(ids_of(tokenizer, ALPACA_NO_INPUT))

    cut = tokenize_example(record, "alpaca", tokenizer, max_seq_len=n_prompt + 3)
    assert len(cut["input_ids"]) == len(cut["labels"]) == n_prompt + 3
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 3

    # Cutting inside the prompt leaves nothing to learn; the example is still returned.
    prompt_only = tokenize_example(record, "alpaca", tokenizer, max_seq_len=n_prompt - 2)
    assert len(prompt_only["labels"]) == n_prompt - 2
    assert set(prompt_only["labels"]) == {IGNORE_INDEX}


