"""Build the shipped miniature target: corpus -> tokenizer -> a small Qwen3ForCausalLM, on CPU.

    python scripts/make_tiny_target.py                      # writes d2sd/assets/tiny-target/
    python scripts/make_tiny_target.py --out /tmp/tt --steps 200

1. Arithmetic word problems from ``d2sd.corpus`` (train seed 1, eval seed 2: disjoint draws).
2. A byte-level BPE tokenizer trained on that corpus (every word and number one token), with
   ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) and ``<|mask|>`` (the drafter's
   mask id) and a Qwen-style chat template.
3. A Qwen3ForCausalLM (hidden 128, 4 layers, 4 q / 2 kv heads, head_dim 32, tied embeddings)
   trained on the chat-formatted problems, loss on the assistant turn only.
4. Greedy answers on held-out problems; prints the final-answer accuracy and saves in the
   Hugging Face layout (config.json, generation_config.json, model.safetensors, tokenizer files).
Deterministic for a given seed and thread count (torch CPU kernels).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from d2sd.corpus import final_answer, make_problems, vocabulary_text  # noqa: E402

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "d2sd", "assets", "tiny-target")


def chat_text(prompt: str, answer: str | None = None) -> str:
    text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    return text if answer is None else text + f"{answer}<|im_end|>\n"


def build_tokenizer(problems: list[tuple[str, str]]):
    """Byte-level BPE over the corpus, wrapped as a ``PreTrainedTokenizerFast`` with the template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # a vocab cap above what the corpus can use: BPE stops once every word is one token
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIAL_TOKENS, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts():
        yield vocabulary_text()
        for prompt, answer in problems:
            yield chat_text(prompt, answer)

    tok.train_from_iterator(texts(), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>", unk_token=None,
                                 additional_special_tokens=["<|im_start|>", "<|mask|>"])
    hf.chat_template = CHAT_TEMPLATE
    hf.model_max_length = 512
    return hf


def encode_examples(tokenizer, problems):
    """Each problem -> (ids, labels) with labels = -100 outside the assistant turn."""
    out = []
    for prompt, answer in problems:
        head = tokenizer(chat_text(prompt), add_special_tokens=False)["input_ids"]
        full = tokenizer(chat_text(prompt, answer), add_special_tokens=False)["input_ids"]
        assert full[:len(head)] == head, "chat prefix does not tokenize as a prefix"
        labels = [-100] * len(head) + full[len(head):]
        out.append((full, labels))
    return out


def build_model(vocab_size: int, args, tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=True,
        rms_norm_eps=1e-6, attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
    )
    torch.manual_seed(args.seed)
    return Qwen3ForCausalLM(config)


def batches(examples, batch_size: int, pad_id: int, rng: random.Random):
    """Endless shuffled right-padded batches: input_ids [b, T], labels [b, T]."""
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [examples[j] for j in order[i:i + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
            labels = torch.full((batch_size, width), -100, dtype=torch.long)
            for r, (x, y) in enumerate(chunk):
                ids[r, :len(x)] = torch.tensor(x)
                labels[r, :len(y)] = torch.tensor(y)
            yield ids, labels


def train(model, examples, args, pad_id: int):
    """AdamW, linear warmup then cosine; right padding never reaches real tokens (causal)."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    model.train()
    stream = batches(examples, args.batch_size, pad_id, random.Random(args.seed))
    t0 = time.time()
    for step in range(args.steps):
        ids, labels = next(stream)
        out = model(input_ids=ids, labels=labels)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            # teacher-forced next-token accuracy on the assistant tokens of this batch
            hit = (out.logits[:, :-1].argmax(-1) == labels[:, 1:])[labels[:, 1:] != -100]
            print(f"step {step:5d}  loss {loss.item():.4f}  tok-acc {hit.float().mean().item():.3f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  "
                  f"{time.time() - t0:6.1f}s", flush=True)
    model.eval()


@torch.no_grad()
def evaluate(model, tokenizer, problems, batch_size: int = 64, max_new_tokens: int = 64) -> float:
    """Fraction of held-out problems whose greedy answer has the right final number."""
    tokenizer.padding_side = "left"
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        enc = tokenizer([chat_text(p) for p, _ in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False)
        out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(final_answer(t) == final_answer(a) for t, (_, a) in zip(texts, chunk))
    tokenizer.padding_side = "right"
    return correct / len(problems)


def make_portable(out: str) -> None:
    """Rewrite the saved configs so transformers 4.56+ loads them as well as 5.x.

    5.x writes ``tokenizer_class: TokenizersBackend`` and a list of ``extra_special_tokens``,
    which 4.x does not know, and keeps the chat template only in ``chat_template.jinja``;
    checked against transformers 4.56.2 (same logits, same chat rendering).
    """
    tc_path = os.path.join(out, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    extra = tc.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        tc["additional_special_tokens"] = extra
    elif extra:
        tc["extra_special_tokens"] = extra
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["model_input_names"] = ["input_ids", "attention_mask"]  # 4.x would add token_type_ids
    tc["chat_template"] = CHAT_TEMPLATE
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2, sort_keys=True)
        f.write("\n")
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    cfg.setdefault("torch_dtype", cfg.get("dtype", "float32"))
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def save(model, tokenizer, out: str, meta: dict) -> None:
    from transformers import GenerationConfig

    os.makedirs(out, exist_ok=True)
    model.generation_config = GenerationConfig(
        do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=model.config.bos_token_id, max_new_tokens=64)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    make_portable(out)
    with open(os.path.join(out, "d2sd_tiny_target.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="output HF model directory")
    p.add_argument("--num-train", type=int, default=30000, help="training problems (seed --seed)")
    p.add_argument("--num-eval", type=int, default=300, help="held-out problems (seed --seed + 1)")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (intermediate = 2x)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers")
    p.add_argument("--seed", type=int, default=1, help="corpus + init + shuffle seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: a shared 2-core box thrashes with 2)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    train_problems = make_problems(args.num_train, seed=args.seed)
    eval_problems = make_problems(args.num_eval, seed=args.seed + 1)
    tokenizer = build_tokenizer(train_problems)
    print(f"tokenizer: {len(tokenizer)} tokens", flush=True)
    examples = encode_examples(tokenizer, train_problems)
    model = build_model(len(tokenizer), args, tokenizer)
    n_params = sum(t.numel() for t in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    t0 = time.time()
    train(model, examples, args, tokenizer.pad_token_id)
    train_s = time.time() - t0
    acc = evaluate(model, tokenizer, eval_problems)
    print(f"eval accuracy (final answer, greedy, {len(eval_problems)} held-out problems): {acc:.3f}")
    meta = {"eval_accuracy": acc, "num_eval": len(eval_problems), "train_seconds": round(train_s, 1),
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
            "num_train": args.num_train, "parameters": n_params,
            "mask_token": "<|mask|>", "mask_token_id": tokenizer.convert_tokens_to_ids("<|mask|>")}
    save(model, tokenizer, args.out, meta)
    print(f"saved to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
