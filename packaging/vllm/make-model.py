#!/usr/bin/env python3
"""Makes a small Llama-architecture model with random weights that `vllm serve DIR` loads.

The test bed has no model hub, so the real-vLLM tests make their own model:

* weights: `LlamaForCausalLM` from a small `LlamaConfig`, initialised at random from a seed
  derived from a stable hash (SHA-256) of NAME. The same NAME always gives the identical model
  (byte for byte); two NAMEs give different models, hence different greedy answers, which is
  how a test tells which model answered.
* tokenizer: a byte-level BPE trained here on a few dozen fixed sentences (vocab ~768),
  wrapped in a `PreTrainedTokenizerFast` with bos/eos/pad and a simple chat template, so
  /v1/completions and /v1/chat/completions both work.
* The output rows (lm_head) of the special tokens and of every token that is not printable
  ASCII (raw bytes, pieces of UTF-8 sequences, newlines) are zeroed: their logit is always 0
  while the best of the ~600 remaining random logits is positive. So greedy decoding never
  stops early (`max_tokens` is always reached: stable answer lengths for tests) and answers
  are plain printable ASCII (no U+FFFD from half a UTF-8 character) that tests can compare.

* GPU sizes (qwen3-0.6b, qwen3-8b): the real Qwen3 architecture and shapes (`Qwen3ForCausalLM`,
  Qwen3-0.6B's and Qwen3-8B's configs: vocab 151936, GQA with 8 KV heads, head_dim 128), bf16,
  made on the GPU when there is one (seconds instead of minutes for 8B parameters). The rows
  of every id the tokenizer does not have are zeroed as well, so the ~151k random rows beyond
  it never win either. 0.6B ties its embeddings, as Qwen3-0.6B does: a zeroed output row is
  then a zeroed input row too, which changes nothing for the never-picked tokens.

Usage (with a python that has torch + transformers + tokenizers: the vLLM venv's, or the GPU
machine's own):
    python packaging/vllm/make-model.py OUT_DIR --name NAME [--size tiny|1gb|qwen3-0.6b|qwen3-8b]
Sizes: tiny = hidden 128, 2 layers (~2 MB); 1gb = hidden 1024, 16 layers (~1 GB, fp32);
qwen3-0.6b (~1.2 GB, bf16); qwen3-8b (~16 GB, bf16).
Offline (HF_HUB_OFFLINE=1), deterministic and idempotent: a stamp file in OUT_DIR records the
parameters; if it matches and the files are there, nothing is done.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

# No network, ever: everything is made locally. Set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Bump when the output for given parameters changes (invalidates existing stamps).
FORMAT = 2
STAMP = ".llmux-model.json"

SIZES = {
    # hidden, intermediate, layers, heads (head_dim 32/64: sizes vLLM's CPU attention supports)
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4
    ),
    "1gb": dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16
    ),
    # Qwen3-0.6B and Qwen3-8B as published (config.json), less the tokenizer
    "qwen3-0.6b": dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True
    ),
    "qwen3-8b": dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False
    ),
}
QWEN3_VOCAB = 151936
VOCAB_SIZE = 768
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Minimal chat template: one line per message, then the assistant tag for the answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Training text for the tokenizer (fixed: the tokenizer must be identical on every run).
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "What is the capital of France? The capital of France is Paris.",
    "Once upon a time there was a small model that lived in a container.",
    "Checkpoint and restore let a process sleep and wake up later.",
    "A language model predicts the next token from the previous ones.",
    "Write a short poem about the sea and the wind.",
    "The weather is sunny with a light breeze in the afternoon.",
    "Please summarize the following text in one sentence.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 2024.",
    "Python, Rust and Go are programming languages.",
    "def hello(name): return f'Hello, {name}!'",
    "The server listens on port 8000 and answers HTTP requests.",
    "Tell me a joke about computers.",
    "Why is the sky blue? Because of Rayleigh scattering.",
    "She sells sea shells by the sea shore.",
    "An apple a day keeps the doctor away.",
    "The meeting starts at nine o'clock in the morning.",
    "Translate 'good morning' into German: Guten Morgen.",
    "Cats and dogs are the most common pets.",
    "The train to Berlin leaves from platform three.",
    "I would like a cup of coffee with milk, please.",
    "Memory, processes, sockets and files are saved in the image.",
    "Models are swapped in and out of the GPU on demand.",
    "The answer to the ultimate question is forty-two.",
    "Rain is expected tomorrow, so take an umbrella.",
    "Reading books is a good way to learn new words.",
    "List three colors: red, green and blue.",
    "The mountain was covered with snow all year long.",
    "Good night, sleep well and see you tomorrow!",
    "Yes. No. Maybe. Thank you. You're welcome.",
    "The library opens at ten and closes at six.",
]


def log(msg: str) -> None:
    print(f"make-model: {msg}", file=sys.stderr)


def seed_of(name: str) -> int:
    """A stable 63-bit seed from NAME (Python's hash() is salted per process: not usable)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def stamp_of(name: str, size: str) -> dict:
    return {
        "format": FORMAT,
        "name": name,
        "size": size,
        "seed": seed_of(name),
        "vocab_size": VOCAB_SIZE,
        **SIZES[size],
    }


def is_complete(out: str, stamp: dict) -> bool:
    try:
        with open(os.path.join(out, STAMP)) as f:
            if json.load(f) != stamp:
                return False
    except (OSError, ValueError):
        return False
    needed = ["config.json", "tokenizer.json", "tokenizer_config.json"]
    has_weights = any(f.endswith(".safetensors") for f in os.listdir(out))
    return has_weights and all(os.path.exists(os.path.join(out, f)) for f in needed)


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[BOS, EOS, PAD, *ROLE_TOKENS],  # ids 0..5
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def make_model(tokenizer, name: str, size: str):
    import torch

    if size.startswith("qwen3"):
        return make_qwen3(tokenizer, name, size)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed_of(name))
    dims = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=dims["num_attention_heads"],
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **dims,
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    zero_never_picked(model, tokenizer)
    return model


def never_picked(tokenizer) -> list[int]:
    """Ids greedy decoding must never pick: see the module docstring."""
    never = set(tokenizer.all_special_ids)
    for tid in range(len(tokenizer)):
        text = tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(tid)])
        if not text or not all(0x20 <= b < 0x7F for b in text.encode("utf-8", "replace")):
            never.add(tid)
    return sorted(never)


def zero_never_picked(model, tokenizer) -> None:
    import torch

    with torch.no_grad():
        for tid in never_picked(tokenizer):
            model.lm_head.weight[tid].zero_()
        model.lm_head.weight[len(tokenizer):].zero_()


def make_qwen3(tokenizer, name: str, size: str):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed_of(name))
    config = Qwen3Config(
        vocab_size=QWEN3_VOCAB,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
        **SIZES[size],
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    zero_never_picked(model, tokenizer)
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--name", required=True, help="model name; seeds the random weights")
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = ap.parse_args()

    out = os.path.abspath(args.out_dir)
    stamp = stamp_of(args.name, args.size)
    if os.path.isdir(out) and is_complete(out, stamp):
        log(f"{out}: model '{args.name}' ({args.size}) already there")
        return 0
    # Replace only what this script made (its stamp) or an empty folder, never a user's files.
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, STAMP)):
        log(f"{out} exists, is not empty and was not made by this script; refusing to overwrite")
        return 1

    import torch

    if not args.size.startswith("qwen3"):
        torch.use_deterministic_algorithms(True)
    log(f"making model '{args.name}' ({args.size}, seed {stamp['seed']}) in {out}")
    # Build next to OUT_DIR and rename at the end: an interrupted run leaves no half model.
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".make-model-", dir=parent)
    try:
        tokenizer = make_tokenizer()
        model = make_model(tokenizer, args.name, args.size)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, STAMP), "w") as f:
            json.dump(stamp, f, indent=1, sort_keys=True)
            f.write("\n")
        # mkdtemp made the folder 0700 (and safetensors a 0600 file): make the model readable
        # by every user (vLLM may run as another user, e.g. in a container).
        os.chmod(tmp, 0o755)  # noqa: S103 (a model is meant to be world-readable)
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), 0o644)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    params = sum(p.numel() for p in model.parameters())
    log(f"done: {params / 1e6:.1f} M parameters, vocab {len(tokenizer)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
