"""Held-out evaluation of an iterate, as a user would judge it (ONLINE.md §0.4 plus answer quality).

For π_t on the fixed held-out prompts (topics never trained on), with the same sampling seed every
iteration:
- sampled success (task judge) with its Wilson interval, mean judge score, length, EOS rate;
- greedy success, and the greedy answers (over-optimisation shows there first);
- KL to π_0 and to π_{t−1}: mean of ℓ_t(y) − ℓ_ref(y) over the sampled answers (Monte Carlo, on the
  sampled token ids);
- fluency: mean per-token NLL of the answers' text under π_0 (the base model), EOS left out, over the whole
  answer, over its first 8 tokens, and over the answers the judge accepts (like for like: short answers
  read as less fluent per token under π_0 even when π_0 writes them);
- repetition: distinct-2 over the answers and the share of answers that repeat a line or phrase;
- win rates against π_{t−1} and π_0: the task judge on sample k of the same prompt, ties ½.
Every sample is written next to the figures (``heldout.jsonl``).
"""

from __future__ import annotations

from pathlib import Path

from preftune.online import store

HEAD = 8  # tokens of each answer in the length-matched fluency


def heldout_generations(run, t: int):
    """π_t's held-out answers: ``(sampled, greedy or None)``, or None without held-out prompts. Under several
    processes every one calls this (each samples its share; all get every answer)."""
    cfg = run.cfg
    if not run.heldout:
        return None
    gens = run.sample(run.heldout, cfg.heldout_samples, cfg.seed + 1, cfg.eval_temperature, cfg.eval_top_p,
                      f"held-out π_{t}")
    greedy = run.sample(run.heldout, 1, cfg.seed + 1, 0.0, 1.0, f"greedy π_{t}") if cfg.greedy_eval else None
    return gens, greedy


def evaluate_policy(run, folder: Path, prev_state: dict | None, t: int, answers=None) -> dict:
    """The figures of π_t on the held-out prompts, from ``answers`` (``heldout_generations``; sampled here
    when not given), and ``heldout.jsonl``."""
    from preftune.eval.policy_eval import mean_se, wilson
    from preftune.eval.quality import distinct_n, lone_list_item, repeats
    from preftune.tasks import word_count

    policy, task = run.policy, run.task
    if answers is None:
        answers = heldout_generations(run, t)
    if answers is None:
        return {}
    gens, greedy = answers

    def judged(g):
        return [[task.judge(p, s.text, s.finished) for s in row] for p, row in zip(g.prompts, g.samples,
                                                                                    strict=True)]

    js = judged(gens)
    flat = [(s, j) for row, jr in zip(gens.samples, js, strict=True) for s, j in zip(row, jr, strict=True)]
    texts = [s.text for s, _ in flat]
    pids = gens.prompt_ids
    rids = [[s.token_ids for s in row] for row in gens.samples]
    cur = policy.token_logps(pids, rids)
    base = policy.token_logps(pids, rids, "init")
    kl_ref = [float(c.sum() - b.sum()) for cs, bs in zip(cur, base, strict=True) for c, b in zip(cs, bs,
                                                                                                   strict=True)]
    # Fluency scores the text, not the decision to stop: a finished answer's EOS token is left out (under
    # the base model, which would have gone on, an early EOS costs several nats, so a task that asks for
    # shorter answers would read as less fluent through that one token).
    fin = [[s.finished for s in row] for row in gens.samples]
    per = [None if (m := text_logp_mean(b, f)) is None else -m for bs, fs in zip(base, fin, strict=True)
           for b, f in zip(bs, fs, strict=True)]  # in the order of ``flat``
    nll = [x for x in per if x is not None]
    ev: dict = {}
    rate = wilson(sum(j.success for _, j in flat), len(flat))
    ev.update(success=rate.value, success_low=rate.low, success_high=rate.high, n=rate.n)
    ev["task_score"] = mean_se([j.score for _, j in flat]).value
    words = mean_se([float(word_count(x)) for x in texts])
    ev.update(len_words=words.value, len_words_se=words.se,
              len_tokens=mean_se([float(s.num_tokens) for s, _ in flat]).value,
              eos_rate=sum(s.finished for s, _ in flat) / len(flat))
    kl = mean_se(kl_ref)
    ev.update(kl_ref=kl.value if t > 0 else 0.0, kl_ref_se=kl.se if t > 0 else 0.0)
    if t > 0:
        prev = policy.token_logps_under(prev_state, pids, rids) if prev_state is not None else base
        kp = mean_se([float(c.sum() - p.sum()) for cs, ps in zip(cur, prev, strict=True)
                      for c, p in zip(cs, ps, strict=True)])
        ev.update(kl_prev=kp.value, kl_prev_se=kp.se)
    fl = mean_se(nll)
    # The mean over a whole answer may favour long answers when their later tokens are the more predictable
    # ones; the first HEAD tokens of every answer compare like with like across lengths.
    head = mean_se([float(-b[: min(HEAD, len(b) - int(f))].mean()) for bs, fs in zip(base, fin, strict=True)
                    for b, f in zip(bs, fs, strict=True) if len(b) > int(f)])
    ev.update(fluency_nll=fl.value, fluency_nll_se=fl.se, fluency_nll_head=head.value,
              fluency_nll_head_se=head.se, distinct2=distinct_n(texts, 2))
    # Per-token NLL rises steeply for short answers (measured on π_0's own word_limit samples: 2.56 under
    # 10 tokens, 1.61 over 20), so a task that asks for short answers moves the whole-answer figure by
    # itself. The NLL of the answers the judge accepts is the like-for-like figure: π_0's accepted answers
    # are the bar a policy that answers as asked can be held to.
    ok = [x for x, (_, j) in zip(per, flat, strict=True) if x is not None and j.success]
    if ok:
        fo = mean_se(ok)
        ev.update(fluency_nll_success=fo.value, fluency_nll_success_se=fo.se)
    rep = wilson(sum(repeats(x) for x in texts), len(texts))
    ev.update(repeat_rate=rep.value, repeat_low=rep.low, repeat_high=rep.high,
              lone_list_rate=sum(lone_list_item(x) for x in texts) / len(texts))
    rows = _rows(gens, js, "sampled")
    for r, x in zip(rows, per, strict=True):
        r["nll_base"] = x
    if greedy is not None:
        gj = judged(greedy)
        g_flat = [j for jr in gj for j in jr]
        gr = wilson(sum(j.success for j in g_flat), len(g_flat))
        g_texts = [s.text for row in greedy.samples for s in row]
        ev.update(greedy_success=gr.value, greedy_low=gr.low, greedy_high=gr.high,
                  greedy_distinct2=distinct_n(g_texts, 2),
                  greedy_repeat_rate=sum(repeats(x) for x in g_texts) / len(g_texts),
                  greedy_len_words=mean_se([float(word_count(x)) for x in g_texts]).value)
        rows += _rows(greedy, gj, "greedy")
    scores = [[j.score for j in jr] for jr in js]
    for name, other in (("prev", _previous(run, t)), ("init", _previous(run, 1) if t > 0 else None)):
        if other is not None:
            ev[f"winrate_{name}"] = _winrate(scores, other)
    store.write_jsonl(folder.with_suffix(".heldout.jsonl") if folder.name == "eval_base" else
                      folder.parent / "heldout.jsonl", rows)
    return ev


def text_logp_mean(token_logps, finished: bool) -> float | None:
    """Mean token log-prob of an answer's text: a finished answer's EOS left out (None: no text token).
    The evaluation's fluency and the loop's fluency tie-break both read answers this way."""
    n = len(token_logps) - int(finished)
    return float(token_logps[:n].mean()) if n > 0 else None


def _rows(gens, js, kind: str) -> list[dict]:
    return [{"kind": kind, "prompt": i, "k": k, "response": s.text, "tokens": s.num_tokens,
             "finished": s.finished, "score": j.score, "success": j.success}
            for i, (row, jr) in enumerate(zip(gens.samples, js, strict=True))
            for k, (s, j) in enumerate(zip(row, jr, strict=True))]


def _previous(run, t: int) -> list[list[float]] | None:
    """Sampled held-out scores of π_{t−1} (read back: nothing is sampled twice)."""
    from preftune.online.store import IterationDir

    path = run.out / "eval_base.heldout.jsonl" if t <= 1 else IterationDir(run.out, t - 1).file("heldout.jsonl")
    if not path.exists():
        return None
    rows = [r for r in store.read_jsonl(path) if r["kind"] == "sampled"]
    n = max((r["prompt"] for r in rows), default=-1) + 1
    out: list[list[float]] = [[] for _ in range(n)]
    for r in sorted(rows, key=lambda r: (r["prompt"], r["k"])):
        out[r["prompt"]].append(r["score"])
    return out


def _winrate(new: list[list[float]], old: list[list[float]]) -> float:
    """Share of (prompt, sample k) where π_new's answer scores above π_old's; ties count ½."""
    pts = [1.0 if a > b else 0.0 if a < b else 0.5 for ra, rb in zip(new, old, strict=True)
           for a, b in zip(ra, rb, strict=True)]
    return sum(pts) / len(pts) if pts else float("nan")
