"""The model-spec parser: a river expression as text -> a fresh river estimator, never `eval`.

    >>> model = parse_model("preprocessing.StandardScaler() | linear_model.LogisticRegression(l2=0.01)")
    >>> describe(model)
    'StandardScaler | LogisticRegression'
    >>> parse_model("forest.ARFClassifier(seed=42, n_models=5)").n_models
    5

The grammar is small on purpose: `module.Class(args)` where `module` is one of river's public
modules (`optim.losses.Log()` reaches one level deeper), arguments that are literals (numbers,
strings, booleans, None, and lists/tuples/dicts/sets of literals) or other such calls
(`linear_model.LogisticRegression(optimizer=optim.SGD(0.05))`), and `|` to build a pipeline.
Anything else -- names, attribute access on values, arithmetic, lambdas, subscripts, dunder names,
non-river classes -- is refused with a `ModelSpecError` naming the problem and where it is. The
parser must never evaluate the text: it walks the AST and only ever calls river classes it found
by attribute lookup on river's own modules.

Every step of a dotted name must stay inside the allowed modules: each module on the way is the
river module of that very path (`bandit.datasets.base.datasets` is river.datasets re-imported, so
it is refused), no module on the way is a data/IO one, and the class found is a river estimator
(a model or pipeline step) or, as an argument, a river object (`optim.SGD`, `stats.Mean`). The
text is bounded (MAX_SPEC_CHARS, MAX_NODES, MAX_DEPTH) and so are ensembles (`learner.max_ensemble`):

    >>> parse_model("ensemble.BaggingClassifier(linear_model.LogisticRegression(), n_models=1e8)")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    driftline.learner.spec.ModelSpecError: bad model spec: n_models=100000000.0: an ensemble of 1 to 100 models ...
"""

from __future__ import annotations

import ast
import importlib
import inspect
from typing import Any

# river's public modules that hold estimators or their parts. Modules of utilities that can touch
# the file system or the network (datasets, stream, api, compat, conf, checks) are left out.
ALLOWED_MODULES = frozenset({
    "active", "anomaly", "bandit", "cluster", "compose", "covariance", "drift", "dummy", "ensemble",
    "facto", "feature_extraction", "feature_selection", "forest", "imblearn", "linear_model", "metrics",
    "misc", "model_selection", "multiclass", "multioutput", "naive_bayes", "neighbors", "optim",
    "preprocessing", "proba", "rules", "sketch", "stats", "time_series", "tree",
})


# Sub-modules that read files or the network, wherever they hang (river.bandit.datasets, ...).
DENIED_SUBMODULES = frozenset({"datasets", "stream", "api", "compat", "conf", "checks", "io"})
MAX_SPEC_CHARS = 4000
MAX_NODES = 500  # AST nodes: calls, arguments, literals
MAX_DEPTH = 24  # nesting of calls, containers and '|'
ENSEMBLE_ARGS = frozenset({"n_models"})


class ModelSpecError(ValueError):
    """A model spec that is not a safe river expression. The message says what and where."""

    def __init__(self, spec: str, problem: str, node: ast.AST | None = None) -> None:
        where = ""
        if node is not None and hasattr(node, "col_offset"):
            col = node.col_offset
            where = f" at column {col + 1}:\n  {spec}\n  {' ' * col}^"
        super().__init__(f"bad model spec: {problem}{where}")
        self.spec = spec
        self.problem = problem


def parse_model(spec: str, max_models: int | None = None) -> Any:
    """A fresh river estimator built from `spec` (see the module docstring for the grammar);
    `n_models` and lists of models may not go over `max_models` (default: the process's
    `learner.max_ensemble` setting)."""
    if max_models is None:
        from ..shared.settings import get_settings

        max_models = get_settings().learner.max_ensemble
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(str(spec), "the spec is empty; e.g. 'linear_model.LogisticRegression()'")
    text = spec.strip()
    if len(text) > MAX_SPEC_CHARS:
        raise ModelSpecError(text[:60] + "...", f"the spec has {len(text)} characters, more than {MAX_SPEC_CHARS}")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        col = (exc.offset or 1) - 1
        raise ModelSpecError(
            text, f"syntax error ({exc.msg}) at column {col + 1}:\n  {text}\n  {' ' * col}^"
        ) from None
    except (RecursionError, MemoryError):
        raise ModelSpecError(text[:60] + "...", "the spec is nested too deeply to parse") from None
    _check_size(text, tree.body)
    model = _Builder(text, max_models).build(tree.body)
    if not isinstance(model, _river_base().Estimator):
        raise ModelSpecError(text, f"{type(model).__name__} is not a river estimator (a model or a pipeline)")
    return model


def _river_base():
    from river import base

    return base


def _check_size(text: str, root: ast.AST) -> None:
    """Refuse a tree that is too big or too deep, walking it without recursion (a long '|' chain
    or deep nesting must be a ModelSpecError, never a RecursionError)."""
    nodes, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ModelSpecError(text[:60] + "...", f"the spec has more than {MAX_NODES} parts")
        if depth > MAX_DEPTH:
            raise ModelSpecError(text[:60] + "...", f"the spec is nested more than {MAX_DEPTH} levels deep")
        if isinstance(node, ast.Attribute):  # a dotted name is one part, however long
            continue
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node)
                     if not isinstance(child, (ast.expr_context, ast.operator, ast.unaryop)))


def describe(model: Any) -> str:
    """A short human name: 'StandardScaler | LogisticRegression'."""
    steps = getattr(model, "steps", None)
    if isinstance(steps, dict):
        return " | ".join(describe(step) for step in steps.values())
    return type(model).__name__


class _Builder:
    def __init__(self, spec: str, max_models: int) -> None:
        self.spec = spec
        self.max_models = max_models

    def fail(self, problem: str, node: ast.AST) -> ModelSpecError:
        return ModelSpecError(self.spec, problem, node)

    def build(self, node: ast.AST) -> Any:
        """The top level: a river object or a `|` pipeline of them."""
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            left, right = self.build(node.left), self.build(node.right)
            try:
                return left | right
            except Exception as exc:  # river refuses some combinations; say so plainly
                raise self.fail(f"cannot pipe {describe(left)} into {describe(right)}: {exc}", node) from None
        if isinstance(node, ast.Call):
            return self.call(node, top=True)
        raise self.fail(f"expected module.Class(...) or a '|' pipeline, got {type(node).__name__}", node)

    def call(self, node: ast.Call, top: bool = False) -> Any:
        cls = self.river_class(node.func)
        base = _river_base()
        if top and not issubclass(cls, base.Estimator):
            raise self.fail(f"{cls.__name__} is not a river estimator (a model or a pipeline step)", node.func)
        if not issubclass(cls, base.Base):
            raise self.fail(f"{cls.__name__} is not a river object", node.func)
        args = [self.value(a) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise self.fail("'**' arguments are not allowed", kw.value)
            kwargs[kw.arg] = self.value(kw.value)
            if kw.arg in ENSEMBLE_ARGS:
                self.bound(kwargs[kw.arg], kw.value, kw.arg)
        for value, arg in zip(args, node.args):
            if isinstance(value, (list, tuple)) and any(isinstance(v, base.Estimator) for v in value):
                self.bound(len(value), arg, "models")
        try:
            return cls(*args, **kwargs)
        except Exception as exc:  # a wrong argument: river's own message is the best explanation
            raise self.fail(f"{cls.__module__.split('.')[1]}.{cls.__name__}(...) refused its arguments: {exc}",
                            node) from None

    def bound(self, value: Any, node: ast.AST, name: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= self.max_models:
            raise self.fail(f"{name}={value!r}: an ensemble of 1 to {self.max_models} models (learner.max_ensemble)",
                            node)

    def river_class(self, func: ast.AST) -> type:
        parts = self.dotted(func)
        if len(parts) < 2:
            raise self.fail(f"'{'.'.join(parts)}' is not module.Class; e.g. linear_model.LogisticRegression", func)
        module_name, names = parts[0], parts[1:]
        if module_name not in ALLOWED_MODULES:
            raise self.fail(f"unknown river module '{module_name}' (allowed: {', '.join(sorted(ALLOWED_MODULES))})",
                            func)
        if any(n.startswith("_") for n in names):
            raise self.fail("private names (starting with '_') are not allowed", func)
        obj: Any = importlib.import_module(f"river.{module_name}")
        path = module_name
        for name in names[:-1]:
            if not hasattr(obj, name):
                raise self.fail(f"river.{path} has no '{name}'", func)
            obj = getattr(obj, name)
            path = f"{path}.{name}"
            # Each step must be the module of that very path: a re-imported module (river.datasets
            # reached as bandit.datasets.base.datasets) would lead out of the allowed ones.
            if not inspect.ismodule(obj) or obj.__name__ != f"river.{path}":
                raise self.fail(f"'{path}' is not an allowed river module", func)
            if name in DENIED_SUBMODULES:
                raise self.fail(f"'{path}' is a data/IO module, not allowed in a model spec", func)
        last = names[-1]
        if not hasattr(obj, last):
            raise self.fail(f"river.{path} has no '{last}'", func)
        obj = getattr(obj, last)
        path = f"{path}.{last}"
        if not inspect.isclass(obj):
            raise self.fail(f"'{path}' is not a river class", func)
        parts = obj.__module__.split(".")
        if parts[0] != "river" or len(parts) < 2 or parts[1] not in ALLOWED_MODULES \
                or DENIED_SUBMODULES.intersection(parts[2:]):
            raise self.fail(f"'{path}' is defined in {obj.__module__}, outside the allowed river modules", func)
        return obj

    def dotted(self, node: ast.AST) -> list[str]:
        if isinstance(node, ast.Name):
            return [node.id]
        if isinstance(node, ast.Attribute):
            return self.dotted(node.value) + [node.attr]
        raise self.fail(f"expected a dotted river name, got {type(node).__name__}", node)

    def value(self, node: ast.AST) -> Any:
        """An argument: a literal, a container of literals, or a nested river object."""
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (int, float, str, bool)) or node.value is None:
                return node.value
            raise self.fail(f"literal of type {type(node.value).__name__} is not allowed", node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
                and isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float)) \
                and not isinstance(node.operand.value, bool):
            return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
        if isinstance(node, ast.List):
            return [self.value(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(self.value(e) for e in node.elts)
        if isinstance(node, ast.Set):
            return {self.value(e) for e in node.elts}
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise self.fail("'**' in a dict is not allowed", node)
            return {self.value(k): self.value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            return self.build(node)
        if isinstance(node, ast.Name):
            raise self.fail(f"'{node.id}' is a name, not a literal; arguments must be literals or river objects",
                            node)
        raise self.fail(f"non-literal argument ({type(node).__name__}); arguments must be literals or river objects",
                        node)
