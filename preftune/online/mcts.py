"""MCTS-DPO (ONLINE.md §10; Xie et al., arXiv 2405.00451; code YuxiXie/MCTS-DPO): the current policy
searches over answer *steps* with MCTS, and the children at every depth of the taken path give
step-level DPO pairs that share their prefix.

A step is one line: sampled from the context (prompt + the steps above it) until a token holding a
newline, or EOS, or ``mcts_step_tokens`` new tokens. Read from the authors' code (``mcts.py``,
``search_config.py``, ``trainer.py``, ``scripts/mcts_mathqa.sh``):

- **Expansion** (``get_actions``): ``mcts_branching`` candidate steps per node (``mcts_root_branching`` at
  the root); at absolute depth ``> mcts_depth`` (``force_terminating_on_depth_limit``) one candidate,
  sampled to the end of the answer (the rollout). Exact duplicates, empty steps and near duplicates
  (BERTScore-style F1 of the policy's last hidden states above ``mcts_similarity_threshold``) are removed.
- **Value of a new child** (``get_values``): ``v = w·conf / max(d_parent − 3, 1)`` with ``conf`` the
  policy's self-evaluation (below) and ``w = mcts_self_eval_weight``; ``v = v_parent`` when that is 0;
  a terminal child (EOS, or the answer's token budget spent) adds its outcome, +1 when the task judge
  accepts the whole answer and −1 otherwise. ``mcts_step_check_weight · step_score`` (the task's per-step
  checker) is an extra term of preftune's, off by default. The step's reward is ``r = v − v_parent``
  (minus ``mcts_kl_coeff · Σ(log π − log π_ref)`` over the step, off by default: the code's ``add_kl`` is
  never switched on, and its ``MCTSNode.r`` refuses a KL term).
- **Self-evaluation**: the authors' hinted prompt (``HINTED_EVAL_PROMPT``: the question, the reference
  solution as "EXAMPLE ANSWER", the proposed partial answer, "(A) incorrect / (B) correct"), answered by the
  policy greedily for 4 tokens after "The answer is"; ``conf`` is the probability the policy puts on the
  "correct" tokens (B, correct, Correct, " B", "(B", …) at the first generated token that reads as a choice.
- **Selection**: PUCT, ``Q + w_exp · p · √N_parent / (1 + N)`` with the prior ``p = exp(Σ log π / len^1.25)``
  of the step; a new child starts at ``Q = V_parent + r``.
- **Backup**: the leaf's ``Q = r + γ·V``; every ancestor's ``V`` is the visit-weighted mean of its
  children's Q (``max(1, N)`` weights, unvisited children included), ``Q = r + γ·V``; ``N`` counts as in the
  code (the search root gains one more per simulation).
- **Search and the taken path**: ``mcts_simulations`` simulations from the current node (4× at the
  prompt), each expanding down to ``mcts_depth`` below it; then the child with the most visits (times 1 +
  the spread of its children's visits, ``consider_diversity``; ties by Q, then V) is taken and the search
  goes on from there, keeping the tree, until a terminal step.
- **Pairs** (``post_tree_construct``, ``tsrl_step``): at each depth of the taken path the children are
  sorted by (Q, visit share π, r, v, N); chosen = the highest, rejected = the lowest (``choose_worst``),
  the second highest, or a random other (the code's ``choose_random``, always on there); a candidate's
  continuation runs through any single-child chain below it. The pair's prompt is prompt + the steps
  taken above it + the tokens the two continuations share (the code sums log-probs from the first
  differing token); identical continuations are skipped and counted.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Protocol

# ---------------------------------------------------------------------------------------------- the tree


@dataclass
class Node:
    ids: list[int]  # the step's token ids (empty at the root)
    text: str = ""
    parent: Node | None = None
    logps: list[float] = field(default_factory=list)  # the policy's log-probs of ``ids`` when sampled
    value: float = 0.0  # v: self-evaluation (+ outcome at a terminal step)
    terminal: bool = False
    finished: bool = False  # ended with EOS
    kl: float = 0.0  # Σ (log π − log π_ref) over the step (with mcts_kl_coeff > 0)
    kl_coeff: float = 0.0
    info: dict = field(default_factory=dict)  # conf, outcome, … (logged)
    children: list[Node] | None = None
    N: int = 0
    V: float = 0.0
    Q: float = 0.0
    pi: float = 0.0  # the search's share for this child when its parent was a search root
    selected: int | None = None  # the child taken from here
    depth: int = 0

    def __post_init__(self):
        self.depth = 0 if self.parent is None else self.parent.depth + 1
        self.Q = self.r if self.parent is None else self.parent.V + self.r

    @property
    def r(self) -> float:
        base = self.value if self.parent is None else self.value - self.parent.value
        return base - self.kl_coeff * self.kl

    def prior(self, length_penalty: float) -> float:
        if not self.logps:
            return 1.0
        return math.exp(sum(self.logps) / len(self.logps) ** length_penalty)

    def path(self) -> list[Node]:
        out, n = [], self
        while n is not None:
            out.append(n)
            n = n.parent
        return out[::-1]

    def answer_ids(self) -> list[int]:
        return [t for n in self.path() for t in n.ids]

    def size(self) -> int:
        return 1 + sum(c.size() for c in self.children or [])


@dataclass(frozen=True)
class Candidate:
    """What an expansion returns for one new child (the environment computes it)."""

    ids: list[int]
    text: str
    logps: list[float]
    value: float
    terminal: bool
    finished: bool
    kl: float = 0.0
    info: dict = field(default_factory=dict)


class StepEnv(Protocol):
    def expand(self, node: Node) -> list[Candidate]: ...


@dataclass
class SearchSettings:
    simulations: int = 8  # per search; 4× at the prompt (the code's n_iters * 4 at depth 0)
    depth: int = 2  # expansion depth below the search root
    w_exp: float = 1.0
    gamma: float = 1.0
    length_penalty: float = 1.25
    consider_diversity: bool = True
    kl_coeff: float = 0.0
    root_factor: int = 4


class MCTS:
    """The search of ``mcts_rl/algorithms/mcts/mcts/mcts.py`` over an environment that expands nodes."""

    def __init__(self, env: StepEnv, s: SearchSettings):
        self.env, self.s = env, s
        self.root: Node | None = None

    # -- one simulation
    def _limit(self, node: Node) -> bool:
        return node.terminal or node.depth - self.root.depth >= self.s.depth

    def _puct(self, node: Node) -> float:
        return node.Q + self.s.w_exp * node.prior(self.s.length_penalty) * math.sqrt(node.parent.N) / (1 + node.N)

    def _select_child(self, node: Node) -> Node:
        return max(node.children, key=self._puct)  # first of equals, like Python's max in the code

    def expand(self, node: Node) -> None:
        if node.terminal:
            return
        kids = [Node(c.ids, c.text, node, c.logps, c.value, c.terminal, c.finished, c.kl, self.s.kl_coeff,
                     dict(c.info)) for c in self.env.expand(node)]
        node.children = kids if node.children is None else node.children + kids

    def backup(self, path: list[Node]) -> None:
        leaf = path[-1]
        leaf.Q = leaf.r + self.s.gamma * leaf.V
        leaf.N += 1
        for node in reversed(path[:-1]):
            w = [max(1, c.N) for c in node.children]
            node.V = sum(wi * c.Q for wi, c in zip(w, node.children, strict=True)) / sum(w)
            node.N += 1
            if node.parent is not None:
                node.Q = node.r + self.s.gamma * node.V

    def simulate(self) -> list[Node]:
        root = self.root
        root.N += 1  # the code counts the root once here and once in the backup
        path = [root]
        while path[-1].children and not self._limit(path[-1]):
            path.append(self._select_child(path[-1]))
        while not self._limit(path[-1]):
            self.expand(path[-1])
            if self._limit(path[-1]) or not path[-1].children:
                break
            path.append(self._select_child(path[-1]))
        self.backup(path)
        return path

    def search(self, root: Node) -> None:
        self.root = root
        n = self.s.simulations * (self.s.root_factor if root.depth == 0 else 1)
        for _ in range(n):
            self.simulate()

    def choose(self, node: Node) -> int:
        """The child taken (mcts_temperature 0): most visits × (1 + its children's visit spread), then Q, V;
        sets each child's share π (uniform over the most visited)."""
        kids = node.children
        visits = [c.N for c in kids]
        best = [i for i, v in enumerate(visits) if v == max(visits)]
        for i, c in enumerate(kids):
            c.pi = 1.0 / len(best) if i in best else 0.0

        def spread(c: Node) -> int:
            return max(x.N for x in c.children) - min(x.N for x in c.children) if c.children else 0

        div = self.s.consider_diversity
        return max(range(len(kids)), key=lambda i: (visits[i] * (spread(kids[i]) + 1 if div else 1),
                                                    kids[i].Q, kids[i].V))

    def build(self, root: Node) -> Node:
        """Search from the prompt, take a step, search again from there … until a terminal step (the code's
        ``tree_constructor``). Returns the root; each node on the taken path has ``selected`` set."""
        node = root
        while not node.terminal:
            self.search(node)
            if not node.children:
                break
            node.selected = self.choose(node)
            node = node.children[node.selected]
        return root


# ---------------------------------------------------------------------------------------------- pairs


@dataclass
class StepPair:
    depth: int
    prompt_ids: list[int]  # the prompt's ids + the taken steps above + the continuations' shared tokens
    chosen_ids: list[int]
    rejected_ids: list[int]
    q_w: float
    q_l: float
    n_w: int
    n_l: int


def _continuation(child: Node) -> list[int]:
    ids = list(child.ids)
    while child.children and len(child.children) == 1:  # no other candidate below: one continuation
        child = child.children[0]
        ids += child.ids
    return ids


def step_pairs(root: Node, prompt_ids: list[int], rejected: str = "lowest", min_q_gap: float = 0.0,
               rng: random.Random | None = None) -> tuple[list[StepPair], dict]:
    """Pairs at every depth of the taken path; ``stats``: identical candidates skipped, small gaps dropped."""
    pairs: list[StepPair] = []
    stats = {"skipped_identical": 0, "dropped_gap": 0, "depths": 0}
    prefix = list(prompt_ids)
    node = root
    while node.children:
        kids = node.children
        stats["depths"] += 1
        if len(kids) >= 2:
            order = sorted(range(len(kids)), key=lambda i: (kids[i].Q, kids[i].pi, kids[i].r, kids[i].value,
                                                            kids[i].N))
            w = order[-1]
            if rejected == "lowest":
                lo = order[0]
            elif rejected == "second":
                lo = order[-2]
            else:
                lo = (rng or random.Random(0)).choice(order[:-1])
            cw, cl = _continuation(kids[w]), _continuation(kids[lo])
            shared = 0
            while shared < min(len(cw), len(cl)) and cw[shared] == cl[shared]:
                shared += 1
            if shared == len(cw) or shared == len(cl):  # no divergence point (identical, or one a prefix)
                stats["skipped_identical"] += 1
            elif kids[w].Q - kids[lo].Q < min_q_gap:
                stats["dropped_gap"] += 1
            else:
                pairs.append(StepPair(node.depth, prefix + cw[:shared], cw[shared:], cl[shared:], kids[w].Q,
                                      kids[lo].Q, kids[w].N, kids[lo].N))
        sel = node.selected if node.selected is not None else (0 if len(kids) == 1 else None)
        if sel is None:
            break
        node = kids[sel]
        prefix += node.ids
    return pairs, stats


# ---------------------------------------------------------------------------------------------- (de)serialise


def tree_to_rows(root: Node) -> list[dict]:
    rows, stack = [], [(root, -1)]
    while stack:
        node, parent = stack.pop(0)
        k = len(rows)
        rows.append({"parent": parent, "ids": node.ids, "text": node.text, "logps": node.logps, "value": node.value,
                     "terminal": node.terminal, "finished": node.finished, "kl": node.kl, "info": node.info,
                     "N": node.N, "V": node.V, "Q": node.Q, "pi": node.pi, "selected": node.selected})
        stack += [(c, k) for c in node.children or []]
    return rows


def tree_from_rows(rows: list[dict], kl_coeff: float = 0.0) -> Node:
    nodes: list[Node] = []
    for r in rows:
        parent = nodes[r["parent"]] if r["parent"] >= 0 else None
        n = Node(r["ids"], r["text"], parent, r["logps"], r["value"], r["terminal"], r["finished"], r["kl"], kl_coeff,
                 r["info"])
        n.N, n.V, n.Q, n.pi, n.selected = r["N"], r["V"], r["Q"], r["pi"], r["selected"]
        if parent is not None:
            parent.children = (parent.children or []) + [n]
        nodes.append(n)
    return nodes[0]


def taken_leaf(root: Node) -> Node:
    node = root
    while node.children and node.selected is not None:
        node = node.children[node.selected]
    return node


# ---------------------------------------------------------------------------------------------- the policy


EVAL_PROMPT = (
    "{question}\nEXAMPLE ANSWER: {solution}\n\nPROPOSED SOLUTION: {answer}\n\n"
    "QUESTION: Evaluate if the proposed solution is logically heading in the correct direction based on the "
    "example answer.\nAnswer Choices:\n(A) incorrect\n(B) correct"
)
EVAL_ANSWER_PREFIX = "The answer is"  # the code's prompt ends "ANSWER: The answer is"; here the assistant's turn
CHOICE_WORDS = ("A", "B", "correct", "wrong", "incorrect")
CHOICE_WORDS_2 = ("Cor", "In", "A", "B", "correct", "wrong", "incorrect")
CORRECT_STRINGS = ("B", "correct", "Correct", "(B", " B", " correct", " Correct")


class PolicyStepEnv:
    """Expansion with a real policy: step sampling (the fast sampler, newline/EOS stops), log-probs and hidden
    states of the sampled ids, self-evaluation, the task judge at terminal steps."""

    def __init__(self, model, tokenizer, task, prompt, prompt_ids: list[int], cfg, seed: int, ref_logps=None):
        self.model, self.tok, self.task, self.prompt = model, tokenizer, task, prompt
        self.prompt_ids = list(prompt_ids)
        self.cfg = cfg
        self.seed = seed
        self.calls = 0
        self.ref_logps = ref_logps  # callable(ctx_ids, [ids]) -> [tensor] (π_0), when mcts_kl_coeff > 0
        from preftune.online.generate import eos_ids

        self.eos = eos_ids(tokenizer, model)
        self.stops = sorted(set(self.eos) | _newline_ids(tokenizer))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.gen_tokens = 0
        self.self_evals = 0
        self.judged = 0
        self.solution = task.solution(prompt) if task.solution is not None else None
        self._correct_ids = sorted({tokenizer.encode(s, add_special_tokens=False)[-1] for s in CORRECT_STRINGS})

    # -- sampling
    def _sample(self, ctx: list[int], n: int, cap: int, stops: list[int]) -> list[list[int]]:
        import torch

        from preftune.online.sampler import sample_token_ids, supports

        self.calls += 1
        seed = self.seed + 7919 * self.calls
        temperature, top_p = self.cfg.resolved("temperature"), self.cfg.resolved("top_p")
        if supports(self.model):
            return sample_token_ids(self.model, [ctx], n=n, temperature=temperature, top_p=top_p,
                                    max_new_tokens=cap, seed=seed, batch_size=n, stop=stops, pad_id=self.pad)[0]
        with torch.random.fork_rng(devices=[]):  # the HF path (architectures the fast engine does not take)
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=torch.tensor([ctx] * n), attention_mask=torch.ones(n, len(ctx),
                                      dtype=torch.long), do_sample=True, temperature=temperature, top_p=top_p,
                                      top_k=None, max_new_tokens=cap, eos_token_id=stops, pad_token_id=self.pad)
        rows = []
        for r in out[:, len(ctx):].tolist():
            cut = next((k + 1 for k, t in enumerate(r) if t in stops), len(r))
            rows.append(r[:cut])
        return rows

    def _step(self, ctx: list[int], n: int, cap: int, to_end: bool) -> list[list[int]]:
        """n steps; a step that is only whitespace so far (a blank line) goes on to the next line."""
        stops = self.eos if to_end else self.stops
        out = self._sample(ctx, n, cap, stops)
        for k, ids in enumerate(out):
            for _ in range(3):
                if ids and ids[-1] in self.eos or len(ids) >= cap or self.tok.decode(ids).strip():
                    break
                ids = ids + self._sample(ctx + ids, 1, cap - len(ids), stops)[0]
            out[k] = ids
        return out

    # -- scoring
    def _forward(self, ctx: list[int], steps: list[list[int]]):
        """(log-probs of each step's ids, last-layer hidden states of its positions), one forward each."""
        import torch

        lps, hs = [], []
        with torch.no_grad():
            for ids in steps:
                x = torch.tensor([ctx + ids])
                out = self.model(input_ids=x, output_hidden_states=True)
                logits = out.logits[0, len(ctx) - 1 : -1].float().log_softmax(-1)  # (len, V)
                lps.append(logits.gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist())
                hs.append(out.hidden_states[-1][0, len(ctx):].float())
        return lps, hs

    def _self_eval(self, answer: str) -> float:
        import torch

        from preftune.tasks import prompt_text

        self.self_evals += 1
        text = EVAL_PROMPT.format(question=prompt_text(self.prompt), solution=self.solution or "(none)",
                                  answer=answer)
        chat = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)
        ids = self.tok(chat + EVAL_ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids])
        past, probs, toks = None, [], []
        with torch.no_grad():
            for _ in range(4):  # greedy, 4 new tokens (the code's generate(max_new_tokens=4, do_sample=False))
                out = self.model(input_ids=x, past_key_values=past, use_cache=True)
                past = out.past_key_values
                p = out.logits[0, -1].float().softmax(-1)
                t = int(p.argmax())
                probs.append(p)
                toks.append(t)
                if t in self.eos:
                    break
                x = torch.tensor([[t]])
        for words in (CHOICE_WORDS, CHOICE_WORDS_2):
            for p, t in zip(probs, toks, strict=True):
                if self.tok.decode([t]).strip() in words:
                    return float(sum(p[i] for i in self._correct_ids))
        return 0.0

    def expand(self, node: Node) -> list[Candidate]:
        cfg = self.cfg
        path_ids = node.answer_ids()
        ctx = self.prompt_ids + path_ids
        budget = cfg.max_new_tokens - len(path_ids)
        if budget <= 0:
            return []
        to_end = cfg.mcts_force_terminate and node.depth + 1 > cfg.mcts_depth
        n = 1 if to_end else (cfg.mcts_root_branching or cfg.mcts_branching) if node.depth == 0 else cfg.mcts_branching
        cap = budget if to_end else min(cfg.mcts_step_tokens, budget)
        steps = self._step(ctx, n, cap, to_end)
        self.gen_tokens += sum(len(s) for s in steps)
        # exact duplicates and empty steps out first (the code's unique_text_list), then near duplicates
        seen, uniq = set(), []
        for s in steps:
            key = tuple(s)
            text = self.tok.decode(s, skip_special_tokens=True)
            if key in seen or (not text.strip() and not (s and s[-1] in self.eos)):
                continue
            seen.add(key)
            uniq.append(s)
        if not uniq:
            uniq = [[self.eos[0]]]
        lps, hs = self._forward(ctx, uniq)
        kept = []
        for k in range(len(uniq)):
            if len(kept) >= cfg.mcts_breadth_limit:
                break
            if any(_bertscore_f(hs[k], hs[j]) > cfg.mcts_similarity_threshold for j in kept):
                continue
            kept.append(k)
        out = []
        for k in kept:
            ids = uniq[k]
            finished = ids[-1] in self.eos
            terminal = finished or len(path_ids) + len(ids) >= cfg.max_new_tokens
            answer = self.tok.decode(path_ids + ids, skip_special_tokens=True).strip()
            info: dict = {}
            value = 0.0
            if cfg.mcts_self_eval_weight:
                conf = self._self_eval(answer)
                info["conf"] = conf
                value = cfg.mcts_self_eval_weight * conf / max(node.depth - 3, 1)
            if value == 0:
                value = node.value
            if terminal:
                self.judged += 1
                j = self.task.judge(self.prompt, answer, finished)
                info["success"] = bool(j.success)
                value += 1.0 if j.success else -1.0
            if cfg.mcts_step_check_weight and self.task.step_score is not None:
                info["step_score"] = self.task.step_score(self.prompt, answer)
                value += cfg.mcts_step_check_weight * info["step_score"]
            kl = 0.0
            if cfg.mcts_kl_coeff and self.ref_logps is not None:
                ref = self.ref_logps(ctx, [ids])[0]
                kl = float(sum(lps[k]) - float(ref.sum()))
            out.append(Candidate(ids, self.tok.decode(ids, skip_special_tokens=True), lps[k], value, terminal,
                                 finished, kl, info))
        return out


_NEWLINES: dict[int, set[int]] = {}


def _newline_ids(tokenizer) -> set[int]:
    """Token ids whose text holds a newline (a step ends at the first of them), once per tokenizer."""
    key = id(tokenizer)
    if key not in _NEWLINES:
        _NEWLINES[key] = {i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])}
    return _NEWLINES[key]


def _bertscore_f(a, b) -> float:
    """F1 of greedy cosine matching between two steps' token embeddings (BERTScore without idf weights; the
    code's ``check_match`` on the policy's last hidden states)."""
    import torch

    if a.shape[0] == 0 or b.shape[0] == 0:
        return 0.0
    a = torch.nn.functional.normalize(a, dim=-1)
    b = torch.nn.functional.normalize(b, dim=-1)
    sim = a @ b.T  # (La, Lb)
    p, r = float(sim.max(1).values.mean()), float(sim.max(0).values.mean())
    return 0.0 if p + r <= 0 else 2 * p * r / (p + r)


# ---------------------------------------------------------------------------------------------- the loop's phases


def settings_of(cfg) -> SearchSettings:
    return SearchSettings(simulations=cfg.mcts_simulations, depth=cfg.mcts_depth, w_exp=cfg.mcts_w_exp,
                          length_penalty=cfg.mcts_length_penalty, kl_coeff=cfg.mcts_kl_coeff,
                          consider_diversity=cfg.mcts_branching > 1)


def tree_phases(run, it, t: int, done: set[str]) -> None:
    """Iteration t's ``sample`` (the trees, trees.jsonl), ``judge`` (figures read off the trees: every value
    was computed in the search, nothing is scored twice) and ``build`` (step pairs with their ids,
    train_input.jsonl, and the reference log-probs) phases."""
    from preftune.online import store
    from preftune.online.generate import encode_prompts

    cfg = run.cfg
    path = it.file("trees.jsonl")
    prompts = run.prompts_for(t)
    if "sample" not in done:
        t0 = time.perf_counter()
        model = run.policy.sampling_model()
        tok = run.policy.tokenizer
        pids = encode_prompts(tok, prompts)
        ref = None
        if cfg.mcts_kl_coeff:
            def ref(ctx, steps):
                return run.policy.token_logps([ctx], [steps], "init")[0]
        rows, gen_tokens, evals, judged = [], 0, 0, 0
        search = settings_of(cfg)
        for i, (prompt, ids) in enumerate(zip(prompts, pids, strict=True)):
            env = PolicyStepEnv(model, tok, run.task, prompt, ids, cfg, cfg.seed + 1000 * t + 100_000 * i, ref)
            root = MCTS(env, search).build(Node([]))
            gen_tokens += env.gen_tokens
            evals += env.self_evals
            judged += env.judged
            rows.append({"prompt": prompt, "prompt_ids": ids, "nodes": tree_to_rows(root)})
        store.write_jsonl(path, rows)
        sizes = [len(r["nodes"]) - 1 for r in rows]
        it.finish("sample", {"prompts": len(rows), "gen_tokens": gen_tokens, "gen_seconds": time.perf_counter() - t0,
                             "tree_size_mean": sum(sizes) / max(1, len(sizes)), "self_evals": evals,
                             "terminal_judged": judged})
    # the per-iteration row takes the sample phase's common keys; MCTS's own figures go through build's info
    rows = store.read_jsonl(path)
    trees = [tree_from_rows(r["nodes"], cfg.mcts_kl_coeff) for r in rows]
    if "judge" not in done:
        leaves = [taken_leaf(root) for root in trees]
        succ = [bool(n.info.get("success", False)) for n in leaves]
        it.finish("judge", {"judge_calls": 0, "judge_seconds": 0.0,
                            "score_mean": _mean([n.Q for n in leaves]),
                            "success": _mean(succ), "eos_rate": _mean([n.finished for n in leaves])})
    if "build" not in done:
        rng = random.Random(cfg.seed + 1000 * t)
        out, skipped, gap, depths = [], 0, 0, 0
        for i, (r, root) in enumerate(zip(rows, trees, strict=True)):
            pairs, st = step_pairs(root, r["prompt_ids"], cfg.mcts_rejected, cfg.mcts_min_q_gap, rng)
            skipped += st["skipped_identical"]
            gap += st["dropped_gap"]
            depths += st["depths"]
            for p in pairs:
                out.append({"prompt": i, "depth": p.depth, "prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                            "rejected_ids": p.rejected_ids, "margin": p.q_w - p.q_l, "q_w": p.q_w, "q_l": p.q_l,
                            "n_w": p.n_w, "n_l": p.n_l})
        sample = it.info("sample")
        info = {"pairs": len(out), "pairs_per_prompt": len(out) / max(1, len(rows)),
                "self_evals": sample.get("self_evals"), "terminal_judged": sample.get("terminal_judged"),
                "pairs_skipped_identical": skipped, "pairs_dropped_gap": gap,
                "tree_size_mean": _mean([root.size() - 1 for root in trees]),
                "taken_depth_mean": depths / max(1, len(rows)),
                "prompts_without_pair": sum(1 for i in range(len(rows)) if not any(o["prompt"] == i for o in out)),
                "margin_mean": _mean([o["margin"] for o in out]),
                "len_chosen": _mean([len(o["chosen_ids"]) for o in out]),
                "len_rejected": _mean([len(o["rejected_ids"]) for o in out])}
        if out:
            run._reference(it, t, run.examples(None, out), out)
        store.write_jsonl(it.file("train_input.jsonl"), out)
        it.finish("build", info)


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else None
