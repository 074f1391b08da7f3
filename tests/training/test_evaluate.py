"""Exact match and sample answers on a chat recipe stop where a chat answer ends: the template's end of turn."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from qlora_lite.data.tokenizing import tokenize_example
from qlora_lite.training.evaluate import exact_match, generate_answers

END_OF_TURN = "<|im_end|>"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ForceTokens(LogitsProcessor):
    """Makes greedy decoding write `script` token by token, whatever the model's own logits."""

    def __init__(self, script: list[int], prompt_length: int) -> None:
        self.script, self.prompt_length = script, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.script[input_ids.shape[1] - self.prompt_length]] = 0.0
        return forced


class ScriptedModel(nn.Module):
    """A real tiny Llama whose greedy answer is scripted; transformers' generate loop and its stop criteria run as they are."""

    def __init__(self, model: nn.Module, script: list[int]) -> None:
        super().__init__()
        self.model, self.script = model, script

    @property
    def generation_config(self):
        return self.model.generation_config

    def generate(self, input_ids, **kwargs):
        processor = LogitsProcessorList([ForceTokens(self.script, input_ids.shape[1])])
        return self.model.generate(input_ids=input_ids, logits_processor=processor, **kwargs)


def test_exact_match_and_sample_answers_stop_at_the_chat_end_of_turn(tiny_llama_dir):
    # A chat template that closes turns with a special token that is not EOS, as Qwen2.5's and Llama-3.1's base tokenizers do.
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", END_OF_TURN]})
    tokenizer.chat_template = CHATML
    end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    assert end_of_turn != tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    model.resize_token_embeddings(len(tokenizer))
    record = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is a colour."}]}
    example = tokenize_example(record, "chat", tokenizer, max_seq_len=512)
    learned = [label for label in example["labels"] if label != -100]
    assert learned[-1] == end_of_turn and tokenizer.eos_token_id not in learned  # trained to end the turn, not to write EOS
    # The model answers exactly what it learned, then (as an untrained model would) rambles on past the end of turn.
    junk = tokenizer("the quick brown fox jumps", add_special_tokens=False)["input_ids"]
    scripted = ScriptedModel(model, learned + junk * 4)

    answers = generate_answers(scripted, tokenizer, [example], torch.device("cpu"))
    assert answers == [{"prompt": answers[0]["prompt"], "answer": "Blue is a colour.", "reference": "Blue is a colour."}]
    assert exact_match(scripted, tokenizer, [example], torch.device("cpu")) == 1.0
