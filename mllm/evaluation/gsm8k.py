"""GSM8K exact match: answer extraction, greedy / majority vote / verifier best-of-N, error taxonomy.

Answer extraction (:func:`extract_answer`): the first number after the first ``####`` when there is one,
else the last number in the text. Numbers are normalised (:func:`normalize_number`): thousands commas,
``$``, a leading ``+`` and spaces dropped, Unicode minus → ``-``, a trailing period is not part of the
number, and the value is written canonically (``5.0`` → ``5``, ``0.50`` → ``0.5``, ``-0`` → ``0``).
Exact match compares the canonical strings of the prediction and of the gold ``#### N``.

Majority vote over N samples: the most frequent parsed answer; unparsable samples do not vote.
**Tie rule**: among answers with the top count, the one whose first occurrence comes earliest in sample
order wins (deterministic given the samples). No parsable answer at all → no answer (counts as wrong).

Verifier best-of-N: ``score(question, solution) -> float`` for each sample, the highest score wins;
ties go to the earliest sample.

Error taxonomy of a wrong answer (:func:`classify_error`):
- ``extraction``: no parsable answer in the solution;
- ``arithmetic``: some computed step is wrong — a GSM8K calculator annotation ``<<a*b=c>>`` or an in-text
  equation ``a op b … = c`` whose left side is pure arithmetic (numbers, + - * / x × ÷, parentheses, %)
  evaluates to something that does not round to c at c's precision (so ``10/3 = 3.33`` is right).
  Not judged: results written as fractions (``= 1/4``), glued to letters (``= 5A``), or followed by more
  arithmetic (``= 46 - 4 = 42``: the next link, ``46 - 4 = 42``, is checked instead); ``x`` is a
  multiplication only between operands (``11x+15`` is algebra); ``c%`` may mean c or c/100. On the 7,473
  GSM8K train solutions this flags 43 of 43,289 steps (human slips in the data), so a flag is strong evidence;
- ``reasoning``: every checkable step is right but the final answer is wrong.
"""
from __future__ import annotations

import ast
import math
import operator
import re
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from tqdm.auto import tqdm

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
STOP_STRINGS = ("\n\nQuestion:", "\nQuestion:")

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
# the sign must not follow a word/number (``10-3`` is a subtraction, not ``-3``)
_NUMBER_RE = re.compile(rf"(?P<sign>(?<![\w)\].])[-−])?(?:\$\s?)?(?P<num>{_NUM})")

ScoreFn = Callable[[str, str], float]
GenerateFn = Callable[..., List[List[int]]]


# ----------------------------------------------------------------------------------------------------
# Answer extraction
# ----------------------------------------------------------------------------------------------------
def normalize_number(text: str) -> Optional[str]:
    """Canonical string of a number written like ``-$1,234.50`` (→ ``-1234.5``); None if not a number."""
    s = text.strip().replace("−", "-").replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if s.startswith("+"):
        s = s[1:]
    if s.startswith("-$"):
        s = "-" + s[2:]
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def find_numbers(text: str) -> List[str]:
    """Every number in ``text``, normalised, in order of appearance."""
    out = []
    for m in _NUMBER_RE.finditer(text):
        sign = "-" if m.group("sign") in ("-", "−") else ""
        n = normalize_number(sign + m.group("num"))
        if n is not None:
            out.append(n)
    return out


def extract_answer(text: Optional[str]) -> Optional[str]:
    """The canonical final answer of a solution (see module docstring), or None when there is none."""
    if not text:
        return None
    if "####" in text:
        after = find_numbers(text.split("####", 1)[1])
        if after:
            return after[0]
    nums = find_numbers(text)
    return nums[-1] if nums else None


def gold_answer(answer: str) -> str:
    """The gold ``#### N`` of a GSM8K record's ``answer``; ValueError when it is missing."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '#### N' line: {answer[-80:]!r}")
    g = extract_answer(answer)
    if g is None:
        raise ValueError(f"GSM8K answer's '####' line holds no number: {answer[-80:]!r}")
    return g


def is_correct(prediction: Optional[str], gold: str) -> bool:
    return prediction is not None and prediction == gold


def truncate_completion(text: str, stop: Sequence[str] = STOP_STRINGS) -> str:
    """Cut a generated solution at the first stop string, and after the line holding ``#### N``
    (a model keeps writing after its answer; what follows is not part of it)."""
    for s in stop:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    i = text.find("####")
    if i >= 0:
        j = text.find("\n", i)
        if j >= 0:
            text = text[:j]
    return text


# ----------------------------------------------------------------------------------------------------
# Voting and verifier selection
# ----------------------------------------------------------------------------------------------------
def majority_vote(answers: Sequence[Optional[str]]) -> Optional[str]:
    """Most frequent non-None answer; ties → earliest first occurrence (module docstring)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def best_of_n(question: str, solutions: Sequence[str], score: ScoreFn) -> Tuple[int, List[float]]:
    """Index of the highest-scoring solution (ties → earliest; a NaN score ranks below every number) and all scores.

    An empty (all-whitespace) solution is not scored: it gets −inf. The verifier never trained on one (its stage skips
    them), so its value there would be arbitrary, and an empty solution is never correct."""
    if not solutions:
        raise ValueError("best_of_n needs at least one solution")
    scores = [float(score(question, s)) if s.strip() else -math.inf for s in solutions]
    # max() never moves past a NaN first element (NaN compares False): a broken score would win by position
    best = max(range(len(scores)), key=lambda i: (-math.inf if math.isnan(scores[i]) else scores[i], -i))
    return best, scores


# ----------------------------------------------------------------------------------------------------
# Arithmetic checking and the error taxonomy
# ----------------------------------------------------------------------------------------------------
_ANNOTATION_RE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
_RESULT_RE = re.compile(rf"=\s*(?P<res>[-−]?\s?\$?\s?(?:{_NUM}))")
_LHS_CHARS = set("0123456789.,$ +-−*/x×÷()%\t")
_TOKEN_RE = re.compile(r"\s*(?:(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|\.\d+%?)|(?P<op>[-−+*/x×÷()]))")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _eval_node(node) -> float:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval_node(node.left), _eval_node(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    raise ValueError("not plain arithmetic")


def eval_arithmetic(expr: str) -> Optional[float]:
    """Value of a plain arithmetic expression (numbers with thousands commas, ``N%`` = N/100, + - * / and
    x × ÷ as operators, parentheses), or None when ``expr`` is not one or has no binary operator."""
    s = expr.replace("$", "").strip()
    pos, parts, n_binary, prev_operand = 0, [], 0, False
    while pos < len(s):
        m = _TOKEN_RE.match(s, pos)
        if not m or m.end() == pos:
            if s[pos:].strip():
                return None
            break
        pos = m.end()
        if m.group("num"):
            tok = m.group("num").replace(",", "")
            parts.append(f"({tok[:-1]}/100)" if tok.endswith("%") else tok)
            prev_operand = True
        else:
            if m.group("op") == "x" and not re.match(r"\s*[\d(.$]", s[pos:]):
                return None  # "11x+15": x is a variable here, not a multiplication
            op = {"x": "*", "×": "*", "÷": "/", "−": "-"}.get(m.group("op"), m.group("op"))
            if op in "+-*/" and prev_operand:
                n_binary += 1
            parts.append(op)
            prev_operand = op == ")"
    if n_binary == 0:
        return None
    try:
        return _eval_node(ast.parse(" ".join(parts), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError):
        return None


def _matches_claim(value: float, claimed: str, scale: float = 1.0) -> bool:
    """value rounds to ``claimed``·``scale`` at the claimed number's precision (half a unit in its last place);
    ``scale`` = 0.01 for a claimed percentage."""
    c = Decimal(claimed)
    decimals = max(0, -c.as_tuple().exponent)
    tol = 0.5 * 10.0 ** (-decimals) * scale
    target = float(c) * scale
    return abs(value - target) <= tol + 1e-9 * max(1.0, abs(target))


# what may follow a claimed result for the step to be judged: "= 1/4" is a fraction, "= 5A/5" algebra,
# "= 46 - 4 = 42" a chain whose next link is checked on its own
_FRACTION_AFTER = re.compile(r"\s*/\s*[\w(]")
_EXPR_AFTER = re.compile(r"\s*[-−+*/x×÷]\s*[\w(.$]")


def arithmetic_steps(solution: str) -> List[Dict]:
    """Every checkable computed step of a solution: [{"expression", "claimed", "value", "ok", "source"}],
    ``source`` "annotation" (``<<a*b=c>>``) or "text" (an in-text ``a op b = c``)."""
    steps: List[Dict] = []

    def add(expr: str, claimed_text: str, source: str, percent: bool = False):
        claimed = normalize_number(claimed_text.replace("−", "-"))
        value = eval_arithmetic(expr)
        if claimed is None or value is None:
            return
        if percent:  # "100% - 40% = 60%" (hundredths) or "100 - 40 = 60%" (already in percent)
            ok = _matches_claim(value, claimed, 0.01) or _matches_claim(value, claimed)
        else:  # "8 * 5% = 40 (cents)": a percentage on the left may be meant in hundredths on the right
            ok = _matches_claim(value, claimed) or ("%" in expr and _matches_claim(value * 100, claimed))
        steps.append({"expression": expr.strip(), "claimed": claimed + ("%" if percent else ""), "value": value,
                      "ok": ok, "source": source})

    for m in _ANNOTATION_RE.finditer(solution):
        add(m.group(1), m.group(2), "annotation")
    text = _ANNOTATION_RE.sub(" ", solution)
    for m in _RESULT_RE.finditer(text):
        after = text[m.end():]
        if _FRACTION_AFTER.match(after) or after[:1].isalpha() or _EXPR_AFTER.match(after):
            continue
        i = m.start()
        j = i
        while j > 0 and text[j - 1] in _LHS_CHARS:
            j -= 1
        lhs = text[j:i]
        # "3, 4 + 5 = 9" / "… = 4. 10/3 = 3.33": a list separator or a sentence end (comma or period
        # followed by a space) is not part of the equation
        cut = max(lhs.rfind(", "), lhs.rfind(". "))
        if cut >= 0:
            j += cut + 2
            lhs = text[j:i]
        k = j + len(lhs) - len(lhs.lstrip())  # index of the first non-space character
        # "box 3 + 2 = 5": an x glued to a word is a letter, not a multiplication
        if k < i and text[k] == "x" and k > 0 and text[k - 1].isalpha():
            k += 1
            while k < i and text[k] == " ":
                k += 1
        expr = text[k:i].strip()
        if not expr:
            continue
        before = text[:k].rstrip()[-1:]
        # an equation that starts with an operator, or with a minus right after a word ("apples - 3 + 2 = 4"),
        # began among words: its real left side is unknown, so it is not judged
        if expr[0] in "+*/x×÷" or (expr[0] in "-−" and before.isalnum()):
            continue
        add(expr, m.group("res"), "text", percent=after[:1] == "%")
    return steps


def classify_error(solution: str, gold: str) -> Tuple[str, Dict]:
    """"correct" | "extraction" | "arithmetic" | "reasoning" (module docstring) and the evidence:
    {"predicted", "gold", "wrong_steps", "n_steps_checked"}."""
    pred = extract_answer(solution)
    steps = arithmetic_steps(solution)
    wrong = [s for s in steps if not s["ok"]]
    info = {"predicted": pred, "gold": gold, "wrong_steps": wrong, "n_steps_checked": len(steps)}
    if is_correct(pred, gold):
        return "correct", info
    if pred is None:
        return "extraction", info
    if wrong:
        return "arithmetic", info
    return "reasoning", info


def error_taxonomy(items: Sequence[Dict], max_examples: int = 3, excerpt_chars: int = 400) -> Dict:
    """Counts and a few examples per category over ``items`` = [{"question", "solution", "gold"}];
    correct items are counted as "correct" and never shown."""
    counts = {"correct": 0, "extraction": 0, "arithmetic": 0, "reasoning": 0}
    examples: Dict[str, List[Dict]] = {"extraction": [], "arithmetic": [], "reasoning": []}
    for it in items:
        cat, info = classify_error(it["solution"], it["gold"])
        counts[cat] += 1
        if cat != "correct" and len(examples[cat]) < max_examples:
            sol = it["solution"]
            examples[cat].append({
                "question": it["question"], "solution": sol if len(sol) <= excerpt_chars else sol[:excerpt_chars] + " …",
                "predicted": info["predicted"], "gold": info["gold"],
                "wrong_step": (f"{info['wrong_steps'][0]['expression']} = {info['wrong_steps'][0]['claimed']} "
                               f"(actually {info['wrong_steps'][0]['value']:g})") if info["wrong_steps"] else None,
            })
    n_wrong = counts["extraction"] + counts["arithmetic"] + counts["reasoning"]
    return {"counts": counts, "n_wrong": n_wrong, "n": len(items), "examples": examples}


# ----------------------------------------------------------------------------------------------------
# Generation and the evaluation loop
# ----------------------------------------------------------------------------------------------------
def default_generate_fn(model) -> GenerateFn:
    """``model.generate_tokens`` when the model brings its own (a Hugging Face baseline adapter), else
    :func:`mllm.models.generation.generate` on our Transformer."""
    own = getattr(model, "generate_tokens", None)
    if callable(own):
        return own
    from mllm.models.generation import generate

    def fn(prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_id=None, seed=None):
        return generate(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_id=eos_id, seed=seed)
    return fn


def _generate_texts(generate_fn: GenerateFn, tokenizer, prompt_ids: List[List[int]], max_new_tokens: int,
                    temperature: float, seed: Optional[int], batch_size: int, desc: str, progress: bool) -> List[str]:
    out: List[str] = []
    for b in tqdm(range(0, len(prompt_ids), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = prompt_ids[b:b + batch_size]
        new = generate_fn(chunk, max_new_tokens, temperature=temperature, eos_id=tokenizer.eot_id,
                          seed=None if seed is None else seed + b)
        if len(new) != len(chunk):
            raise ValueError(f"generate returned {len(new)} sequences for {len(chunk)} prompts")
        for ids in new:
            ids = [t for t in ids if t != tokenizer.eot_id]
            out.append(truncate_completion(tokenizer.decode(ids)))
    return out


def _accuracy(preds: Sequence[Optional[str]], golds: Sequence[str]) -> Dict:
    correct = sum(int(is_correct(p, g)) for p, g in zip(preds, golds))
    return {"accuracy": correct / len(golds), "correct": correct, "n": len(golds)}


def evaluate_gsm8k(model, tokenizer, rows: Sequence[dict], n_samples: int = 8, temperature: float = 0.7,
                   max_new_tokens: int = 256, seed: int = 0, score_fn: Optional[ScoreFn] = None,
                   generate_fn: Optional[GenerateFn] = None, template: str = PROMPT_TEMPLATE,
                   max_len: Optional[int] = None, batch_size: int = 8, max_examples: int = 3,
                   progress: bool = True) -> Dict:
    """Greedy, majority-of-N and (with ``score_fn``) verifier best-of-N exact match on GSM8K ``rows``
    ({"question", "answer"}), plus the error taxonomy of the greedy solutions.

    Prompts are ``template.format(question=...)``; with ``max_len`` (the model's context) a prompt keeps its
    last ``max_len - max_new_tokens`` tokens. Sampling uses ``temperature`` and seeds ``seed + batch offset``.
    Returns {"greedy", "majority", "verifier", "oracle" (any of N right), "taxonomy", "per_question",
    "n_samples", "temperature", "max_new_tokens", "template", "convention"}; "verifier" is
    {"not_run": why} without a ``score_fn``, and "majority"/"oracle" likewise when ``n_samples`` is 0.
    """
    if not rows:
        raise ValueError("rows is empty")
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if max_len is not None and max_len <= max_new_tokens:
        raise ValueError(f"max_len={max_len} must exceed max_new_tokens={max_new_tokens}")
    gen = generate_fn or default_generate_fn(model)
    questions = [r["question"] for r in rows]
    golds = [gold_answer(r["answer"]) for r in rows]
    prompt_ids = []
    for q in questions:
        ids = tokenizer.encode(template.format(question=q))
        prompt_ids.append(ids if max_len is None else ids[-(max_len - max_new_tokens):])

    greedy_text = _generate_texts(gen, tokenizer, prompt_ids, max_new_tokens, 0.0, None, batch_size,
                                  "gsm8k greedy", progress)
    greedy_pred = [extract_answer(t) for t in greedy_text]
    res: Dict = {"greedy": _accuracy(greedy_pred, golds)}

    samples: List[List[str]] = [[] for _ in rows]
    if n_samples > 0:
        rep = [p for p in prompt_ids for _ in range(n_samples)]
        flat = _generate_texts(gen, tokenizer, rep, max_new_tokens, temperature, seed, batch_size,
                               f"gsm8k {n_samples} samples", progress)
        samples = [flat[i * n_samples:(i + 1) * n_samples] for i in range(len(rows))]
    sample_preds = [[extract_answer(t) for t in s] for s in samples]
    if n_samples > 0:
        maj = [majority_vote(p) for p in sample_preds]
        res["majority"] = {**_accuracy(maj, golds), "n_samples": n_samples}
        orc = [g if any(is_correct(x, g) for x in p) else None for p, g in zip(sample_preds, golds)]
        res["oracle"] = {**_accuracy(orc, golds), "n_samples": n_samples}
    else:
        maj = [None] * len(rows)
        res["majority"] = res["oracle"] = {"not_run": "n_samples = 0"}

    ver: List[Optional[str]] = [None] * len(rows)
    if score_fn is not None and n_samples > 0:
        for i, q in enumerate(tqdm(questions, desc="gsm8k verifier", disable=not progress, leave=False)):
            best, _ = best_of_n(q, samples[i], score_fn)
            ver[i] = sample_preds[i][best]
        res["verifier"] = {**_accuracy(ver, golds), "n_samples": n_samples}
    else:
        res["verifier"] = {"not_run": "no verifier score function given" if score_fn is None else "n_samples = 0"}

    res["taxonomy"] = error_taxonomy(
        [{"question": q, "solution": t, "gold": g} for q, t, g in zip(questions, greedy_text, golds)], max_examples)
    res["per_question"] = [
        {"gold": g, "greedy": gp, "majority": m, "verifier": v, "sample_answers": sp}
        for g, gp, m, v, sp in zip(golds, greedy_pred, maj, ver, sample_preds)]
    res.update({"n_samples": n_samples, "temperature": temperature, "max_new_tokens": max_new_tokens,
                "template": template, "seed": seed,
                "convention": ("exact match of the normalised final answer ('#### N', else the last number); "
                               f"greedy; majority of {n_samples} samples at T={temperature} (ties: earliest first "
                               "occurrence); verifier best-of-N over the same samples")})
    return res
