"""Per-token diagnosis of on-policy distillation for one question (DESIGN.md, "Per-token diagnosis").

For a question: sample the student's rollouts and verify them; choose nodes in exponentially growing depth
windows within the budget; score every rollout once with the student and once with each teacher (each on
its own context followed by the student's tokens); at each node build K, estimate S_k by continuations that
share the node's cached prefix, and compute the quantities of alignment.py. Everything is seeded per
question, so a resumed run gives the same records.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.kvcache import LayerKV, build_cache, cache_keyword, layer_kv, returned_cache
from ..core.models import logit_width
from .alignment import Candidates, on_candidates, on_k, over_vocabulary, value_and_ideal
from .rollouts import Sampling, continue_rows, draw
from .verifiers import Verifier
from .vocab_stats import COL, vocab_stats


@dataclass(frozen=True)
class AlignConfig:
    rollouts: int = 8
    continuations: int = 8
    candidates: int = 4  # top tokens taken from the student and from each teacher
    budget: int = 64  # nodes per question
    temperature: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    beta: float = 0.5  # JSD(β): the teacher's weight in the mixture, as in GKD
    pass_rate: tuple[float, float] | None = None  # analyse only questions whose rollouts pass at this rate
    max_batch: int | None = None  # continuations decoded together at most (None: a node's |K| x C at once)


@dataclass
class Scorer:
    """A model with the prompt it is shown for a record: the student, or a teacher configuration."""

    name: str
    model: Any
    prompt: Callable[[dict[str, Any]], list[int]]  # record -> token ids before the rollout


@dataclass
class Question:
    index: int
    record: dict[str, Any]
    qid: Any  # the record's id field, or its index


@dataclass
class _Rollouts:
    """One question's sampled rollouts and what every node of it shares: its prompt (the student's ids), the
    rollouts (token ids), their verdicts, and the question's generator (its draws continue node after node)."""

    q: Question
    prompt: list[int]
    rollouts: list[list[int]]
    correct: list[bool]
    gen: torch.Generator


def depth_windows(length: int) -> list[range]:
    """Positions 0..length-1 cut into windows [2^w - 1, 2^(w+1) - 1): sizes 1, 2, 4, 8, ..."""
    out, w = [], 0
    while 2 ** w - 1 < length:
        out.append(range(2 ** w - 1, min(2 ** (w + 1) - 1, length)))
        w += 1
    return out


def choose_nodes(lengths: Sequence[int], budget: int, rng: random.Random,
                 correct: Sequence[bool] | None = None) -> list[tuple[int, int, int]]:
    """(rollout, position, window) triples, at most one per rollout and window, `budget` in all.

    The budget is shared equally between correct and incorrect rollouts (the comparison the diagnosis is
    for: 1 correct rollout in 8 would otherwise get an eighth of the nodes), then equally between the
    rollouts of each class. A rollout given k of its W windows takes k evenly spaced ones, shifted by its
    index in its class so that rollouts, which share their first tokens, do not all score the same shallow prefix. The
    position inside a window is random. The cost follows the budget, not the rollout length."""
    windows = [depth_windows(n) for n in lengths]
    correct = list(correct) if correct is not None else [False] * len(lengths)
    classes = [[r for r in range(len(lengths)) if correct[r] is c] for c in (True, False)]
    room = [sum(len(windows[r]) for r in cls) for cls in classes]
    share = _split(budget, room)
    chosen: list[tuple[int, int, int]] = []
    for cls, n in zip(classes, share, strict=True):
        counts = _split(n, [len(windows[r]) for r in cls])
        for i, (r, k) in enumerate(zip(cls, counts, strict=True)):
            w_count = len(windows[r])
            for w in sorted({(round(j * w_count / k) + i) % w_count for j in range(k)}):
                chosen.append((r, rng.choice(windows[r][w]), w))
    return sorted(chosen)


def _split(total: int, caps: Sequence[int]) -> list[int]:
    """`total` shared as equally as possible among slots with capacities `caps` (what one cannot take, the
    others do)."""
    out = [0] * len(caps)
    left = min(total, sum(caps))
    while left:
        open_slots = [i for i, c in enumerate(caps) if out[i] < c]
        for i in open_slots[:left]:
            out[i] += 1
        left -= min(left, len(open_slots))
    return out


def extend(model: Any, kv: list[LayerKV], length: int, ids: Sequence[int]) -> tuple[torch.Tensor, list[LayerKV]]:
    """Run `ids` after a cached prefix of `length` positions: (len(ids), V) logits and the longer cache."""
    device = next(model.parameters()).device
    cache = build_cache([(k[:, :, :length], v[:, :, :length]) for k, v in kv])
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True,
                    **cache_keyword(model, cache))
    return out.logits[0], layer_kv(returned_cache(out))


def prompt_state(model: Any, ids: list[int]) -> tuple[torch.Tensor, list[LayerKV]]:
    """The prompt's last logits (V,) and cache: a scorer sees its prompt once per question."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    return out.logits[0, -1], layer_kv(returned_cache(out))


def rollout_logits(model: Any, state: tuple[torch.Tensor, list[LayerKV]], n_prompt: int,
                   rollout: list[int]) -> tuple[torch.Tensor, list[LayerKV]]:
    """(n, V) next-token logits at each rollout position (position t predicts rollout[t]) and the cache."""
    last, kv = state
    if len(rollout) == 1:
        return last[None], kv
    logits, kv = extend(model, kv, n_prompt, rollout[:-1])  # (n - 1, V)
    return torch.cat([last[None], logits], 0), kv


class Diagnosis:
    """Runs the diagnosis question by question for one student, its teachers and a verifier."""

    def __init__(self, student: Scorer, tokenizer: Any, teachers: list[Scorer], verifier: Verifier,
                 cfg: AlignConfig, stop_ids: set[int]) -> None:
        self.student, self.tok, self.teachers = student, tokenizer, teachers
        self.verifier, self.cfg, self.stop_ids = verifier, cfg, stop_ids
        self.device = next(student.model.parameters()).device
        # models of one family can pad their output layer to different widths (Qwen2.5: 151936 and 152064
        # rows for the same 151665 tokens): distributions are compared over the columns all of them have
        self.width = min(logit_width(s.model) for s in [student, *teachers])
        self.sampling = Sampling(cfg.temperature, stop_ids, cfg.max_batch, self.width)

    def text(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def correct(self, ids: Sequence[int], record: dict[str, Any]) -> bool:
        return self.verifier.check(self.text(ids), record)

    def run(self, q: Question, on_node: Callable[[], None] = lambda: None) -> tuple[dict, list[dict]]:
        """(question record, node records) for one question."""
        cfg = self.cfg
        gen = torch.Generator(self.device).manual_seed(cfg.seed * 1_000_003 + q.index)
        prompt = self.student.prompt(q.record)
        state = prompt_state(self.student.model, prompt)
        first = draw(state[0][None, :self.width], cfg.temperature, gen, n=cfg.rollouts)[0]  # (R,)
        rollouts = continue_rows(self.student.model, state[1], len(prompt), first, cfg.max_new_tokens, gen,
                                 self.sampling)
        correct = [self.correct(r, q.record) for r in rollouts]
        rate = sum(correct) / len(correct)
        head = {"kind": "question", "question": q.qid, "index": q.index, "pass_rate": rate,
                "correct": correct, "lengths": [len(r) for r in rollouts], "prompt_tokens": len(prompt)}
        lo, hi = cfg.pass_rate or (0.0, 1.0)
        if not lo <= rate <= hi:
            return {**head, "selected": False, "nodes": 0}, []
        nodes = choose_nodes([len(r) for r in rollouts], cfg.budget, random.Random(cfg.seed * 1_000_003 + q.index),
                             correct)
        records = list(self._nodes(_Rollouts(q, prompt, rollouts, correct, gen), state, nodes, on_node))
        return {**head, "selected": True, "nodes": len(records)}, records

    def _nodes(self, run: _Rollouts, state: tuple[torch.Tensor, list[LayerKV]], nodes: list[tuple[int, int, int]],
               on_node: Callable[[], None]) -> Iterator[dict]:
        """The node records of one question, rollout by rollout: each rollout is scored once by the student
        (its cache kept for the continuations) and once by each teacher; `state` is the student's prompt state."""
        teacher_states = [(t, t.prompt(run.q.record)) for t in self.teachers]
        teacher_states = [(t, ids, prompt_state(t.model, ids)) for t, ids in teacher_states]
        for r, rollout in enumerate(run.rollouts):
            here = [(t, w) for rr, t, w in nodes if rr == r]
            if not here:
                continue
            zs, kv = rollout_logits(self.student.model, state, len(run.prompt), rollout)
            zs = zs[:, :self.width]  # (n, V)
            pos = torch.tensor([t for t, _ in here], device=zs.device)
            zp, y = zs[pos], torch.tensor(rollout, device=zs.device)[pos]  # (N, V), (N,)
            teach = []
            for t, ids, t_state in teacher_states:
                zt, _ = rollout_logits(t.model, t_state, len(ids), rollout)
                zq = zt[pos, :self.width].to(zp.device)
                teach.append((t.name, zq, vocab_stats(zp, zq, y, self.cfg.beta)))
            for i, (t, w) in enumerate(here):
                yield self._node(run, r, (t, w), kv, zp[i], [(name, zq[i], st[i]) for name, zq, st in teach])
                on_node()

    def _candidates(self, y: int, zp: torch.Tensor, zqs: list[torch.Tensor]) -> list[int]:
        k = self.cfg.candidates
        out = [y]
        for z in [zp, *zqs]:
            out += [t for t in z.topk(min(k, z.shape[0])).indices.tolist() if t not in out]
        return out

    def _success(self, kv, length: int, rollout: list[int], t: int, cands: list[int], gen, record) -> torch.Tensor:
        """S_k: the share of C student continuations that verify after forcing candidate k at position t."""
        c = self.cfg.continuations
        first = torch.tensor(cands, device=self.device).repeat_interleave(c)  # (|K| C,)
        rows = continue_rows(self.student.model, kv, length + t, first, self.cfg.max_new_tokens - t, gen,
                             self.sampling)
        ok = torch.tensor([self.correct(rollout[:t] + row, record) for row in rows], dtype=torch.float64)
        return ok.view(len(cands), c).mean(1)  # (|K|,)

    def _node(self, run: _Rollouts, r: int, at: tuple[int, int], kv: list[LayerKV], zp: torch.Tensor,
              teach: list[tuple[str, torch.Tensor, torch.Tensor]]) -> dict:
        """One node's record: K, S, and per teacher the quantities of alignment.py. The node is position t
        of rollout r, in depth window w (`at` = (t, w)); kv: the student's cache of the rollout; zp: (V,) the
        student's logits there; teach: per teacher (name, (V,) logits, its vocab_stats row)."""
        (t, w), rollout = at, run.rollouts[r]
        y = rollout[t]
        cands = self._candidates(y, zp, [zq for _, zq, _ in teach])
        s = self._success(kv, len(run.prompt), rollout, t, cands, run.gen, run.q.record)
        stats = teach[0][2] if teach else vocab_stats(zp[None], zp[None], torch.tensor([y], device=zp.device))[0]
        lp = candidate_logs(zp, cands, stats[COL["lnorm_p"]])  # (K,)
        p = lp.exp()
        v, _ = value_and_ideal(on_k(lp), s)
        rec = {"kind": "node", "question": run.q.qid, "rollout": r, "correct": run.correct[r], "position": t,
               "window": w, "token": y, "text": self.text([y]), "V": v, "p_mass": float(p.sum()),
               "K": [{"token": k, "text": self.text([k]), "p": float(p[i]), "S": float(s[i]), "q": {}}
                     for i, k in enumerate(cands)],
               "continuations": self.cfg.continuations, "teachers": {},
               "entropy": float(stats[COL["entropy_p"]])}
        for name, zq, st in teach:
            lq = candidate_logs(zq, cands, st[COL["lnorm_q"]])
            for item, q_k in zip(rec["K"], lq.exp().tolist(), strict=True):
                item["q"][name] = q_k
            rec["teachers"][name] = self._teacher_entry(Candidates(cands, lp, s), lq, st)
        return rec

    def _teacher_entry(self, c: Candidates, lq: torch.Tensor, st: torch.Tensor) -> dict:
        beta = self.cfg.beta
        return {**on_candidates(c.lp, lq, c.s, beta),
                "align_vocab": over_vocabulary(c, lq, st.cpu(), beta),
                "kl": float(st[COL["kl_pq"]]), "js": float((1 - beta) * st[COL["kl_pm"]] + beta * st[COL["kl_qm"]]),
                "q_mass": float(lq.exp().sum())}


def candidate_logs(z: torch.Tensor, cands: list[int], lnorm: torch.Tensor) -> torch.Tensor:
    """(V,) logits -> (K,) float64 full-vocabulary log-probabilities of the candidates (index 0 is the
    observed token y), as (z_k - z_y) - lnorm with lnorm = lse(z) - z_y from vocab_stats: exact near p_y = 1."""
    z64 = z.double()
    idx = torch.tensor(cands, device=z.device)
    return ((z64[idx] - z64[cands[0]]) - lnorm.double()).cpu()
