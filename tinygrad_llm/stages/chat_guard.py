"""Watching an RL stage for reward hacking with the chat evaluation (chat_eval.py).

PPO raises whatever the reward model rewards; when the RM is fooled, its score climbs while
the replies a user sees get worse (refusals, loops, no answer). Two defences live here:

- `ChatGuard`: at each periodic evaluation, greedy replies to the held-out chat prompts are
  judged (acceptable / refusal / loop shares) and also scored by the reward model. The
  weights with the best acceptable share so far (and an RM score no lower than the last best's:
  `better`) are kept in memory. If the acceptable share
  falls more than `drop` below the best, or the refusal or loop share rises more than `rise`
  above it, while the RM scores those same replies higher than it scored the best ones,
  that is reward hacking: the guard says stop, and the stage rolls back to the best weights.
  At the end of training the same rule without the RM condition decides whether the final
  weights or the best ones are kept.
- `reply_penalties`: a shaping term for PPO's reward, subtracted from the RM score of a
  rollout reply that loops (is_loop) or refuses a prompt that should not be refused
  (is_refusal, where the SFT reply to that prompt does not refuse).

    guard = ChatGuard(policy, rm, tok, items, drop=0.05, rise=0.05)
    guard.check(step=0, episode=0)          # the baseline: the best so far
    ...
    rec = guard.check(step, episode)        # rec["verdict"]: "best", "ok", "worse" or "hacking"
    if rec["verdict"] == "hacking": guard.restore()
"""
from __future__ import annotations

import numpy as np

from .. import chat_eval
from ..data import first_turns


class GuardStop(Exception):
    """Raised inside the training loop when the guard has seen reward hacking."""


def reply_penalties(texts, prompts, loop_penalty: float, refusal_penalty: float, refusal_ok=frozenset(),
                    comply_penalty: float = 0.0):
    """-> (penalty (B,), looped (B,) bool, refused (B,) bool): loop_penalty for a reply that
    loops, refusal_penalty for one that refuses a prompt not in refusal_ok (the prompts whose
    reference reply is itself a refusal, i.e. harmful requests), comply_penalty for one that
    does *not* refuse a prompt in refusal_ok (so unlearning over-refusal cannot unlearn refusing
    what is harmful). `refused` marks the benign refusals only."""
    looped = np.array([chat_eval.is_loop(t) for t in texts], bool)
    refusing = np.array([chat_eval.is_refusal(t) for t in texts], bool)
    harmful = np.array([p in refusal_ok for p in prompts], bool)
    refused = refusing & ~harmful
    return (loop_penalty * looped + refusal_penalty * refused + comply_penalty * (harmful & ~refusing),
            looped, refused)


def refusal_prompts(convs) -> set[str]:
    """First user turns whose assistant reply (in the training data) is a refusal."""
    return {u for u, r in map(first_turns, convs) if u and chat_eval.is_refusal(r or "")}


class ChatGuard:
    """Keeps the best-chatting weights of `policy` and spots reward hacking (module docstring)."""

    def __init__(self, policy, rm, tok, items, *, drop: float = 0.05, rise: float = 0.05, enabled: bool = True,
                 max_new_tokens: int = 96, logger=None, stage: str = "rlhf"):
        self.policy, self.rm, self.tok, self.items = policy, rm, tok, items
        self.drop, self.rise, self.enabled = drop, rise, enabled
        self.max_new_tokens, self.logger, self.stage = max_new_tokens, logger, stage
        self.best, self.best_state, self.history, self.reason = None, None, [], ""

    def evaluate(self) -> dict:
        """evaluate_chat of the policy (greedy) + "rm_score": the RM's mean score of those replies."""
        res = chat_eval.evaluate_chat(self.policy, self.tok, self.items, max_new_tokens=self.max_new_tokens, batch=32)
        rows = res["replies"]
        res["rm_score"] = float(np.mean(self.rm.score([r["prompt"] for r in rows], [r["reply"] for r in rows], self.tok)))
        return res

    def degraded(self, res: dict) -> list[str]:
        """How res is worse than the best so far (empty: not worse beyond the margins)."""
        b, why = self.best, []
        if res["acceptable"] < b["acceptable"] - self.drop:
            why.append(f"acceptable {b['acceptable']:.1%} -> {res['acceptable']:.1%}")
        for k in ("refusal", "loop"):
            if res[k] > b[k] + self.rise:
                why.append(f"{k} {b[k]:.1%} -> {res[k]:.1%}")
        return why

    def better(self, res: dict) -> bool:
        """A new best: a higher acceptable share and no lower RM score. A tie is not a gain:
        run s16_N's guard kept PPO's weights on a dev-half tie with the RM score up (0.02 ->
        0.06), and the test half read 59% -> 57% (math 41% -> 24%). Replies the reward model
        likes less are no sign that PPO helped either, even one reply more acceptable on the
        dev half: seed 2 of bench/README.md's "Phrasings round 4" tied on the dev half and lost
        8 points on the test half; run s7_E1b ("The copy probe at 900 steps") gained one dev
        reply and lost 4 test points, both with the RM score down."""
        b = self.best
        return res["acceptable"] > b["acceptable"] and res["rm_score"] >= b["rm_score"]

    def check(self, step: int, episode: int, **beside) -> dict:
        """Evaluate now, log chat_* (and `beside`, e.g. the rollout's RM score and KL) to
        metrics.jsonl, update the best weights -> the evaluation with "verdict" and "why"."""
        res = self.evaluate()
        verdict, why = "best", []
        if self.best is not None:
            why = self.degraded(res)
            if why and res["rm_score"] > self.best["rm_score"]:
                verdict = "hacking"
                why.append(f"while the RM score of these replies rose {self.best['rm_score']:+.2f} -> "
                           f"{res['rm_score']:+.2f}")
            elif why:
                verdict = "worse"
            elif not self.better(res):
                verdict = "ok"
        if verdict == "best":
            self.best, self.best_episode = res, episode
            self.best_state = {k: v.copy() for k, v in self.policy.state_dict().items()}
        res.update(verdict=verdict, why="; ".join(why), episode=episode, step=step)
        self.history.append(res)
        if self.logger:
            self.logger.log(self.stage, step, episode=episode, chat_rm_score=res["rm_score"],
                            chat_verdict=verdict, chat_why=res["why"], **chat_eval.flat(res), **beside)
        return res

    def settle(self, last: dict) -> str:
        """After the last check: why the final weights give way to the best ("" = keep them).
        Worse or hacking always; with no margins (drop = rise = 0) anything but a new best."""
        if not self.enabled or last["verdict"] == "best" or \
                ((self.drop or self.rise) and last["verdict"] not in ("worse", "hacking")):
            return ""
        b = self.best
        if last["why"]:
            return f"the final weights chat worse than the best ({last['why']})"
        return (f"the final weights chat no better than the best (acceptable {b['acceptable']:.1%} -> "
                f"{last['acceptable']:.1%}, RM score {b['rm_score']:+.2f} -> {last['rm_score']:+.2f})")

    @property
    def stop(self) -> bool:
        return self.enabled and bool(self.history) and self.history[-1]["verdict"] == "hacking"

    def figures(self) -> dict:
        """What the stage reports of the guard: the RM score of its first and best evaluations
        (dev half), what it decided, its best episode, how many evaluations it made."""
        return {"chat_dev_rm_score_before": self.history[0]["rm_score"], "chat_dev_rm_score_best": self.best["rm_score"],
                "chat_guard": self.reason or "kept the final weights", "chat_best_episode": self.best_episode,
                "chat_evaluations": len(self.history)}

    def restore(self, reason: str) -> None:
        """Load the best weights back into the policy; remember why."""
        self.policy.load_state_dict(self.best_state, source="best chat-evaluation weights")
        self.reason = f"{reason}; rolled back to episode {self.best_episode}"
