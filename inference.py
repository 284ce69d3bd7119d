"""Talk to a trained MyLLM checkpoint.

    python inference.py --prompt "你好，请介绍一下你自己。"     # one answer
    python inference.py                                        # interactive chat (/reset, /exit)
    python inference.py --raw --prompt "人工智能" --checkpoint checkpoints/pretrain_final.safetensors
    echo "3 + 5 等于多少？" | python inference.py               # piped stdin: one turn per line
    python inference.py --serve [--host 127.0.0.1] [--port 8000]  # OpenAI API + chat page (tinygrad_llm/serve.py)

--checkpoint defaults to the latest stage that exists: rlvf_final, rlhf_final, sft_final,
pretrain_final (in --ckpt-dir). A chat reply is the likeliest of --best-of 8 candidates (the greedy one
and 7 samples; tinygrad_llm/rerank.py), printed whole; --best-of 1 streams the greedy reply token by
token. With --serve, the decoding flags (--temperature, --top-p, --top-k, --max-new-tokens) are the
defaults of requests that leave them out (greedy; the server does not rerank)."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

LATEST = ("rlvf_final", "rlhf_final", "sft_final", "pretrain_final")


def find_checkpoint(ckpt_dir: Path) -> Path:
    for name in LATEST:
        p = ckpt_dir / f"{name}.safetensors"
        if p.exists():
            return p
    raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (looked for {', '.join(LATEST)}); "
                            "train one with: python train.py --stage all")


def answer(model, tok, ids, args, stream: bool) -> str:
    from tinygrad_llm.rerank import best_of
    from tinygrad_llm.tokenizer import EOS_ID, IM_END_ID

    stops = (EOS_ID,) if args.raw else (IM_END_ID, EOS_ID)

    def on_token(step, tokens):
        t = int(tokens[0])
        if t not in stops:
            print(tok.decode([t]), end="", flush=True)

    common = dict(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                  no_repeat_ngram=getattr(args, "no_repeat_ngram", 0), stop_tokens=stops)
    if args.best_of > 1 and args.temperature == 0 and not args.raw:
        # the likeliest of best_of candidates (rerank.py): nothing to stream until all are scored;
        # seeded (0 unless --seed), so the same prompt gets the same answer, as with greedy
        gen = best_of(model, [ids], args.best_of, rng=0 if args.seed is None else args.seed, **common)
        text = tok.decode(gen.replies()[0])
        if stream:
            print(text, flush=True)
        return text
    gen = model.generate([ids], temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                         rng=args.seed, stream=on_token if stream else None, **common)
    text = tok.decode(gen.replies()[0])
    if stream:
        print(flush=True)
    return text


def encode_turn(tok, messages, raw_text, args):
    if args.raw:
        return tok.encode(raw_text, allow_special=False)
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def chat(model, tok, args) -> int:
    """Interactive when stdin is a terminal; otherwise each input line is one user turn."""
    interactive = sys.stdin.isatty()
    if interactive:
        print("MyLLM chat — /reset clears the conversation, /exit quits.")
    messages = []
    while True:
        try:
            line = input("你: " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = []
            print("(conversation cleared)")
            continue
        messages.append({"role": "user", "content": line})
        if interactive:
            print("MyLLM: ", end="", flush=True)
        reply = answer(model, tok, encode_turn(tok, messages, line, args), args, stream=True)
        messages.append({"role": "assistant", "content": reply})


def serve(model, tok, path: Path, args) -> int:
    """--serve: the HTTP server of tinygrad_llm/serve.py, with this command's decoding flags as
    the defaults of requests that leave them out."""
    from tinygrad_llm import serve as S

    defaults = S.Decoding(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                          no_repeat_ngram=args.no_repeat_ngram)
    return S.serve(model, tok, f"myllm-{path.stem}", args.host, args.port, defaults)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", help="answer this once and exit")
    ap.add_argument("--checkpoint", help="a .safetensors checkpoint (default: latest stage in --ckpt-dir)")
    ap.add_argument("--ckpt-dir", default="checkpoints")
    ap.add_argument("--vocab", help="vocabulary JSON (default: vocab.json beside the checkpoint)")
    ap.add_argument("--raw", action="store_true", help="continue plain text, no chat template (pretrained model)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    # defaults chosen by bench/chat_decoding.py on the dev half of the chat evaluation (README):
    # plain greedy answered the most prompts; sampling (T 0.7, top-p 0.9) and repetition
    # penalties answered fewer; n-gram blocking answered as many but breaks the worked
    # arithmetic, whose restated equation legitimately repeats ("所以23 + 45 = 68")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    ap.add_argument("--best-of", type=int, default=8, metavar="N",
                    help="chat with --temperature 0: answer with the likeliest of N candidates, the greedy reply and "
                         "N - 1 samples at T 0.8, top-p 0.9 (tinygrad_llm/rerank.py; 3-4 more held-out chat "
                         "prompts answered in 100 than greedy, bench/README.md 'Best of n'); 1 = plain greedy")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="divide the logits of tokens already seen by this (1 = off)")
    ap.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                    help="never repeat an N-character sequence within a reply (0 = off); see bench/chat_decoding.py")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--serve", action="store_true", help="serve the OpenAI chat API and the chat page over HTTP")
    ap.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on (default: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="--serve: port (0 = any free one)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    from tinygrad_llm import EXIT_BAD_INPUT
    from tinygrad_llm.checkpoint import CheckpointError, load_gpt
    from tinygrad_llm.runtime import configure_threads

    try:
        if args.max_new_tokens <= 0:
            raise ValueError("--max-new-tokens must be positive")
        if args.temperature < 0:
            raise ValueError("--temperature must be >= 0")
        if args.best_of < 1:
            raise ValueError(f"--best-of must be >= 1 (1: plain greedy), got {args.best_of}")
        if args.repetition_penalty <= 0 or args.no_repeat_ngram < 0 or not 0 < args.top_p <= 1:
            raise ValueError("need --repetition-penalty > 0, --no-repeat-ngram >= 0 and 0 < --top-p <= 1")
        if args.serve and (args.prompt is not None or args.raw):
            raise ValueError("--serve answers chat requests over HTTP: leave out --prompt and --raw")
        if not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {args.port}")
        path = Path(args.checkpoint) if args.checkpoint else find_checkpoint(Path(args.ckpt_dir))
        if not path.exists():
            raise FileNotFoundError(f"{path}: checkpoint not found")
        vocab = Path(args.vocab) if args.vocab else path.parent / "vocab.json"
        configure_threads(args.threads)
        model, tok = load_gpt(path, vocab)
        if args.serve:
            return serve(model, tok, path, args)
        if args.prompt is not None:
            if not args.prompt.strip():
                raise ValueError("--prompt is empty: give some text, or leave --prompt out to chat")
            ids = encode_turn(tok, [{"role": "user", "content": args.prompt}], args.prompt, args)
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                answer(model, tok, ids, args, stream=True)
            return 0
        return chat(model, tok, args)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
