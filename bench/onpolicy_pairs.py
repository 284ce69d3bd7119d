"""Preference pairs from the SFT model's own samples (InstructGPT's reward model is trained on
comparisons of the policy's samples, not of hand-made replies): sample candidates for SFT
*training* chat prompts (meta, knowledge, harmful), judge each with the chat evaluation's rule
(chat_eval.judge: the intent's keywords; a refusal for a harmful request), and keep up to two
(acceptable and closed, unacceptable) pairs per prompt. Appended to a copy of the data's reward_data.json,
they train a reward model whose on-policy ranking bench/best_of.py measures against the default's
(bench/README.md, "Best of n").

    python bench/onpolicy_pairs.py --checkpoint CK/sft_final.safetensors --out DATA2/reward_data.json
        # DATA2: a copy of data/; then
    python train.py --stage reward --data-dir DATA2 --ckpt-dir CK2      # CK2 holds CK's sft_final and vocab.json
    python bench/best_of.py --checkpoint CK/sft_final.safetensors --reward-model CK/reward_model.safetensors \\
        --reward-model CK2/reward_model.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

from tinygrad_llm import chat_eval as C  # noqa: E402
from tinygrad_llm.checkpoint import load_gpt  # noqa: E402
from tinygrad_llm.rerank import candidates  # noqa: E402
from tinygrad_llm.tokenizer import IM_END_ID  # noqa: E402
from chat import HARMFUL_KEYWORDS  # noqa: E402  (data/chat.py: a harmful request is answered by refusing)


def training_prompts(data_dir: Path) -> list[dict]:
    """Every training phrasing of the meta, knowledge and harmful intents, as chat_eval items."""
    items = []
    for cat in ("meta", "knowledge", "harmful"):
        for it in json.loads((data_dir / "src" / "chat" / f"{cat}.json").read_text(encoding="utf-8")):
            kw = it.get("keywords") or (HARMFUL_KEYWORDS if cat == "harmful" else [])
            items += [{"prompt": p, "category": cat, "keywords": kw} for p in it["train_prompts"] if kw]
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-dir", default=str(ROOT / "data"))
    ap.add_argument("--out", required=True, help="the data's reward_data.json with the new pairs appended")
    ap.add_argument("--prompts", type=int, default=1200)
    ap.add_argument("--n", type=int, default=6, help="candidates per prompt: greedy + n - 1 samples")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-p", type=float, default=0.9)
    args = ap.parse_args(argv)
    model, tok = load_gpt(args.checkpoint)
    items = training_prompts(Path(args.data_dir))
    items = [items[i] for i in np.random.default_rng(0).permutation(len(items))[:args.prompts]]
    ids, n = [tok.chat_prompt(it["prompt"]) for it in items], args.n
    texts, closed = [], []
    for i in range(0, len(ids), 32):
        r, f = candidates(model, ids[i:i + 32], n, temperature=args.temperature, top_p=args.top_p, rng=i,
                          max_new_tokens=96, stop_tokens=(IM_END_ID,))
        texts += [tok.decode(x) for x in r]
        closed += f.tolist()
    ok = np.array([C.judge(items[j // n], t, c)["acceptable"] for j, (t, c) in enumerate(zip(texts, closed))])
    ok = ok.reshape(-1, n)
    pairs = []
    for i, it in enumerate(items):
        good = list(dict.fromkeys(texts[i * n + k] for k in range(n) if ok[i, k] and closed[i * n + k]))
        bad = list(dict.fromkeys(texts[i * n + k] for k in range(n) if not ok[i, k]))
        pairs += [{"prompt": it["prompt"], "chosen": g, "rejected": b, "kind": "on_policy_" + it["category"]}
                  for g, b in list(zip(good * 2, bad))[:2]]
    base = json.loads((Path(args.data_dir) / "reward_data.json").read_text(encoding="utf-8"))
    Path(args.out).write_text(json.dumps(base + pairs, ensure_ascii=False, indent=0), encoding="utf-8")
    print(f"{len(items)} training prompts x {n} candidates: {ok.mean():.1%} acceptable (greedy {ok[:, 0].mean():.1%}); "
          f"{(ok.any(1) & ~ok.all(1)).mean():.1%} of the prompts have both kinds")
    print(f"{len(pairs)} pairs {dict(Counter(p['kind'] for p in pairs))} + {len(base)} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
