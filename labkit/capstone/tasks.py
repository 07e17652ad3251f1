"""Two tasks that need long context, generated offline from a seed (no downloads).

* **Multi-query associative recall** (as in the Zoology study of efficient language models): a sequence opens
  with `n_pairs` key-value pairs, then filler, then `n_queries` queries, each a key followed by its value. A
  causal language model must predict the value after each queried key, which it can only do by looking back to
  where that key was bound. Accuracy and loss count the query positions only: every other next token is either
  random (the pairs) or trivial (the filler), and would swamp the measurement.
* **ListOps** (as in the Long Range Arena): nested prefix expressions over the digits 0..9 with the operators
  MIN, MAX, MED (the lower median) and SM (sum modulo 10), e.g. `[MAX 2 9 [MIN 4 7 ] 0 ]` = 9; a classifier
  reads the whole padded expression and predicts its value (10 classes). Generated and evaluated in Python.

Token ids. Recall: 0 is the filler, keys are `1..n_keys`, values `n_keys+1..n_keys+n_values`. ListOps: 0 is the
padding, digit d is `d+1`, the operators `[MIN [MAX [MED [SM` are 11..14 and `]` is 15 (`LISTOPS_VOCAB` = 16).
"""

from __future__ import annotations

import dataclasses

import numpy as np

OPERATORS = ("MIN", "MAX", "MED", "SM")
CLOSE = 15
LISTOPS_VOCAB = 16
_OP_TOKEN = {op: 11 + i for i, op in enumerate(OPERATORS)}


@dataclasses.dataclass(frozen=True)
class Batch:
    """Model inputs `[batch, seq]` int32, targets (next tokens or labels) and weights (1 where graded)."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray


def recall_vocab(n_keys: int = 16, n_values: int = 16) -> int:
    """Vocabulary size of the recall task: filler + keys + values."""
    return 1 + n_keys + n_values


def associative_recall(seed: int, batch: int, seq_len: int, *, n_pairs: int = 8, n_queries: int = 8,
                       n_keys: int = 16, n_values: int = 16) -> Batch:
    """`batch` recall sequences of length `seq_len`: `inputs [batch, seq]`, next-token `targets`, `weights`.

    Pairs first (distinct keys, random values), filler 0s, then the queries at the end, each a key drawn from
    the pairs followed by its value. `weights` is 1 exactly at the queried keys' positions, where the target
    is the value bound to that key; 0 elsewhere.
    """
    if n_pairs > n_keys:
        raise ValueError(f"n_pairs={n_pairs} needs at least as many keys, got n_keys={n_keys}")
    if seq_len < 2 * (n_pairs + n_queries):
        raise ValueError(f"seq_len={seq_len} cannot hold {n_pairs} pairs and {n_queries} queries "
                         f"(needs >= {2 * (n_pairs + n_queries)})")
    rng = np.random.default_rng(seed)
    seq = np.zeros((batch, seq_len), np.int32)
    weights = np.zeros((batch, seq_len), np.float32)
    query_start = seq_len - 2 * n_queries
    for row in range(batch):
        keys = rng.choice(n_keys, n_pairs, replace=False) + 1
        values = rng.integers(0, n_values, n_pairs) + 1 + n_keys
        seq[row, 0:2 * n_pairs:2], seq[row, 1:2 * n_pairs:2] = keys, values
        asked = rng.integers(0, n_pairs, n_queries)
        seq[row, query_start::2], seq[row, query_start + 1::2] = keys[asked], values[asked]
        weights[row, query_start::2] = 1.0
    targets = np.concatenate([seq[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
    return Batch(seq, targets, weights)


def query_accuracy(logits: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> float:
    """Fraction of weighted positions where `argmax(logits [batch, seq, vocab])` equals `targets [batch, seq]`."""
    correct = (np.asarray(logits).argmax(-1) == np.asarray(targets)).astype(np.float32)
    return float((correct * weights).sum() / np.asarray(weights).sum())


def random_expression(rng: np.random.Generator, max_depth: int, max_args: int = 4, p_branch: float = 0.3):
    """A random ListOps tree: an int digit, or `(operator, [children])` nested at most `max_depth` deep."""
    if max_depth == 0:
        return int(rng.integers(0, 10))
    children = []
    for _ in range(int(rng.integers(2, max_args + 1))):
        deeper = max_depth > 1 and rng.random() < p_branch
        children.append(random_expression(rng, max_depth - 1, max_args, p_branch) if deeper
                        else int(rng.integers(0, 10)))
    return (OPERATORS[int(rng.integers(0, len(OPERATORS)))], children)


def evaluate(tree) -> int:
    """The value 0..9 of a ListOps tree (MED is the lower median: the middle of the sorted arguments)."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    args = sorted(evaluate(child) for child in children)
    return {"MIN": args[0], "MAX": args[-1], "MED": args[(len(args) - 1) // 2], "SM": sum(args) % 10}[op]


def to_tokens(tree) -> list[int]:
    """Token ids of a ListOps tree in prefix form: `[OP`, the arguments, `]`."""
    if isinstance(tree, int):
        return [tree + 1]
    op, children = tree
    return [_OP_TOKEN[op], *(token for child in children for token in to_tokens(child)), CLOSE]


def to_text(tree) -> str:
    """The readable form of a ListOps tree, e.g. `[MAX 2 9 [MIN 4 7 ] 0 ]`."""
    if isinstance(tree, int):
        return str(tree)
    op, children = tree
    return f"[{op} " + " ".join(map(to_text, children)) + " ]"


def listops(seed: int, batch: int, seq_len: int, *, max_depth: int = 3, max_args: int = 4) -> Batch:
    """`batch` ListOps expressions padded to `seq_len`: `inputs [batch, seq]`, labels `targets [batch]` 0..9.

    Expressions longer than `seq_len` are drawn again; `weights [batch]` are all 1 (one label per sequence).
    """
    rng = np.random.default_rng(seed)
    inputs = np.zeros((batch, seq_len), np.int32)
    labels = np.zeros(batch, np.int32)
    row = 0
    while row < batch:
        tree = random_expression(rng, max_depth, max_args)
        tokens = to_tokens(tree)
        if len(tokens) <= seq_len and not isinstance(tree, int):
            inputs[row, :len(tokens)], labels[row] = tokens, evaluate(tree)
            row += 1
    return Batch(inputs, labels, np.ones(batch, np.float32))
