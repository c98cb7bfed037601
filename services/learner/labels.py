"""Labels on the wire are strings; river wants Python values. This is the one mapping both ways.

    >>> to_river("1"), to_river("spam"), to_text(True), to_text(1), to_text(None)
    (1, 'spam', '1', '1', None)

Integer-looking labels become ints because river's binary classifiers learn 0/1 (or bools), not
"0"/"1"; model outputs come back as text (bool -> int first) so that y_true and y_pred compare as
strings everywhere downstream. Must never lose a label: anything not integer-looking stays a str.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import re
from collections.abc import Collection
from typing import Any

from ..ingestion.validate import MAX_ABS_NUMBER  # what ingestion lets through as a field, a regression label too

_INT = re.compile(r"[+-]?\d{1,18}")


@functools.lru_cache(maxsize=4096)  # asked for every label by every role; a stream has few label values
def to_river(label: str) -> int | str:
    """The value river learns for a label string."""
    return int(label) if _INT.fullmatch(label) else label


def to_text(y: Any) -> str | None:
    """A model output as the label string it stands for (None stays None)."""
    if y is None:
        return None
    if isinstance(y, bool):
        return str(int(y))
    if isinstance(y, float) and y.is_integer():
        return str(int(y))
    if hasattr(y, "item") and not isinstance(y, str):  # numpy scalars
        return to_text(y.item())
    return str(y)


# A class's text, per class value and type (True, 1 and 1.0 are equal keys but typed apart here):
# asked for every class of every answer of every role.
_class_text = functools.lru_cache(maxsize=4096, typed=True)(to_text)


def proba_to_text(proba: dict[Any, float] | None) -> dict[str, float]:
    """predict_proba_one's answer with text keys (classes merged if two map to the same text)."""
    out: dict[str, float] = {}
    for k, v in (proba or {}).items():
        key = _class_text(k)
        if key is not None:
            out[key] = out.get(key, 0.0) + float(v)
    return out


def argmax(proba: dict[str, float]) -> str | None:
    """The class with the highest probability (None when the model knows no class yet)."""
    return max(proba, key=proba.__getitem__) if proba else None


# -- the task (classification or regression) and text inputs: one place for every caller ----------

@functools.cache
def _is_pipeline(kind: type) -> bool:
    """Per type: river's isinstance goes through a Python-level metaclass hook, and this is asked
    several times per example."""
    from river import compose

    return issubclass(kind, compose.Pipeline)


def is_regressor(model: Any) -> bool:
    """Whether a river model predicts numbers (the task follows from the model).

        >>> from river import linear_model
        >>> is_regressor(linear_model.LinearRegression()), is_regressor(linear_model.LogisticRegression())
        (True, False)
    """
    # Asked several times for every prediction and label, and a model's task never changes:
    # the answer is kept on the model (~1.3 us per question for a pipeline, ~4 per example).
    try:
        return model.__dict__[_REGRESSOR]
    except (AttributeError, KeyError):
        pass
    found = _find_regressor(model)
    try:
        model.__dict__[_REGRESSOR] = found
    except AttributeError:  # no instance dict (slots): asked again next time
        pass
    return found


_REGRESSOR = "_driftline_regressor"  # set by is_regressor; pickled with the model, harmlessly


def _find_regressor(model: Any) -> bool:
    from river import base

    while _is_pipeline(type(model)) and model.steps:  # a pipeline's task is its last step's
        model = next(reversed(model.steps.values()))
    # A wrapper (river asks its last step) or a plain model: river's isinstance says.
    return isinstance(model, base.Regressor)


class LabelError(ValueError):
    """A label the model cannot learn (text for a regressor); the message says why."""


def to_target(model: Any, label: str) -> int | str | float:
    """The value `model` learns for a label string: a finite float for a regressor, else `to_river`.

        >>> from river import linear_model
        >>> to_target(linear_model.LinearRegression(), "12.5"), to_target(linear_model.LogisticRegression(), "1")
        (12.5, 1)
        >>> to_target(linear_model.LinearRegression(), "spam")
        Traceback (most recent call last):
        ...
        driftline.learner.labels.LabelError: label 'spam' is not a number within ±1e+30 (a regressor learns numbers)
    """
    if not is_regressor(model):
        return to_river(label)
    try:
        value = float(label)
    except ValueError:
        value = math.nan
    if not -MAX_ABS_NUMBER <= value <= MAX_ABS_NUMBER:  # NaN fails it too
        raise LabelError(f"label {label[:40]!r} is not a number within ±{MAX_ABS_NUMBER:g} "
                         "(a regressor learns numbers)")
    return value


def label_kind(label: str) -> str:
    """"number" for a label river learns as an int, else "text" (a class of another kind).

        >>> label_kind("1"), label_kind("-3"), label_kind("spam"), label_kind("1.5")
        ('number', 'number', 'text', 'text')
    """
    return "number" if isinstance(to_river(label), int) else "text"


def label_problem(model: Any, label: str, classes: Collection[str] = (), max_classes: int | None = None
                  ) -> tuple[str, str] | None:
    """Why `model` cannot learn `label`: (the dead letter's reason, its detail), or None.
    `classes`: a classifier's labels learned so far; `max_classes`: how many it may learn.

    river raises on such a label, and a tree's class counts keep it: every later example would
    fail too. So it never reaches the model: a binary classifier (river's LogisticRegression,
    Perceptron, ...) learns the labels 0 and 1 only, and a multiclass one cannot mix numbers and
    text (its classes are sorted) nor, from untrusted input, grow without end.

        >>> from river import linear_model, tree
        >>> label_problem(linear_model.LogisticRegression(), "1") is None
        True
        >>> label_problem(linear_model.LogisticRegression(), "yes")[0]
        'unlearnable_label'
        >>> label_problem(tree.HoeffdingTreeClassifier(), "yes", classes={"0", "1"})[1]
        "label 'yes' is text where the model's classes are numbers: river cannot order the two kinds"
        >>> label_problem(tree.HoeffdingTreeClassifier(), "c", classes={"a", "b"}, max_classes=2)[0]
        'too_many_classes'
        >>> label_problem(linear_model.LinearRegression(), "spam")[0]
        'non_numeric_label'
    """
    if is_regressor(model):
        try:
            to_target(model, label)
        except LabelError as exc:
            return "non_numeric_label", str(exc)
        return None
    if not getattr(model, "_multiclass", True):  # river learns y as a bool: 7 would be True, "yes" raises
        if to_river(label) in (0, 1):
            return None
        return "unlearnable_label", (f"label {label[:40]!r} is not 0 or 1, the classes of a binary classifier "
                                     "(river's multiclass.OneVsRestClassifier(...) learns any)")
    if not classes or label in classes:
        return None
    kind, known = label_kind(label), label_kind(next(iter(classes)))
    if kind != known:
        return "unlearnable_label", (f"label {label[:40]!r} is {kind} where the model's classes are "
                                     f"{'numbers' if known == 'number' else 'text'}: river cannot order the two kinds")
    if max_classes is not None and len(classes) >= max_classes:
        return "too_many_classes", (f"label {label[:40]!r} would be class {len(classes) + 1}; "
                                    f"learner.max_classes is {max_classes}")
    return None


def one_hot(x: dict[str, Any]) -> dict[str, float]:
    """Text values as `name=value: 1.0` (what river's OneHotEncoder gives), numbers as they are."""
    return {(f"{k}={v}" if isinstance(v, str) else k): (1.0 if isinstance(v, str) else v) for k, v in x.items()}


_ONE_HOT = "_driftline_one_hot"  # on a model that has learned from text: True = one-hot, False = as it is


def _call(model: Any, method: str, x: dict[str, Any], *args: Any) -> Any:
    """`model.method(x, *args)`; a model that cannot learn text values (a linear model, a scaler)
    gets them one-hot encoded from the first text it learns on, for the rest of its life, so that
    a categorical field never crashes a service and the model still learns from it. Trees and
    naive Bayes take text as it is.

    Which of the two is decided once, at the first example with text that the model *learns*, on
    a copy (`_learns_text`): a model that failed halfway through `learn_one` (a scaler that had
    updated the numbers before it met the text) would be left half-taught, and one taught the
    same examples elsewhere (a prediction replica) would differ from it. A prediction meanwhile
    never decides anything: it cannot change what the model learns.
    """
    one_hot_mode = getattr(model, _ONE_HOT, None)
    if one_hot_mode:
        return getattr(model, method)(one_hot(x), *args)
    if one_hot_mode is None and method == "learn_one" and _has_text(x):
        one_hot_mode = not _learns_text(model, x, *args)
        setattr(model, _ONE_HOT, one_hot_mode)
        return getattr(model, method)(one_hot(x) if one_hot_mode else x, *args)
    try:
        return getattr(model, method)(x, *args)
    except (TypeError, ValueError):
        if one_hot_mode is not None or not _has_text(x):
            raise
        return getattr(model, method)(one_hot(x), *args)  # no text learned yet: the codes are unknown to it


def _has_text(x: dict[str, Any]) -> bool:
    """Whether any value of `x` is text (a str, or a subclass of it).

        >>> _has_text({"a": 1.0, "b": "KR"}), _has_text({"a": 1.0}), _has_text({})
        (True, False, False)
    """
    return any(map(isinstance, x.values(), itertools.repeat(str)))  # no generator: asked at every example learned


def _learns_text(model: Any, x: dict[str, Any], *args: Any) -> bool:
    """Whether `model` learns `x`, text values as they are, without an error (tried on a copy)."""
    trial = copy.deepcopy(model)
    try:
        trial.learn_one(x, *args)
    except (TypeError, ValueError):
        return False
    return True


def answer(model: Any, x: dict[str, Any]) -> tuple[str | None, dict[str, float]]:
    """A model's (y_pred, proba) as the contract's text, before the label: a classifier's argmax
    and probabilities, a regressor's number as text and no probabilities.

        >>> from river import linear_model, tree
        >>> model = linear_model.LogisticRegression()
        >>> learn(model, {"country": "KR", "amount": 1.0}, "1")
        >>> answer(model, {"country": "KR", "amount": 1.0})[0]
        '1'
        >>> answer(linear_model.LinearRegression(), {"amount": 1.0})
        ('0.0', {})
    """
    if is_regressor(model):
        y = _call(model, "predict_one", x)
        return (None if y is None else repr(float(y))), {}
    proba = proba_to_text(_call(model, "predict_proba_one", x))
    return argmax(proba), proba


def learn(model: Any, x: dict[str, Any], label: str) -> None:
    """Teach `model` one example (raises LabelError for a label it cannot learn, before learning)."""
    _call(model, "learn_one", x, to_target(model, label))


def error(y_pred: str | None, y_true: str) -> float | None:
    """A regression answer's error, y_pred - y_true (None without a numeric prediction or label).

        >>> error("12.0", "10.5"), error(None, "1"), error("1", "spam")
        (1.5, None, None)
    """
    try:
        value = float(y_pred) - float(y_true) if y_pred is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None
