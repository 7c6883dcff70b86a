"""The package's layering (issue 17): no import cycles, ``lebm_zoo`` never depends on ``datamodules`` at import time,
callbacks never import the CLI, one owner for the version and for the text format models store, and the public
names that go with it.

The static checks read every ``lebm_zoo/**/*.py`` with :mod:`ast` (module-level imports: the statements that run
when a module is imported, i.e. not inside a function or class body, nor under ``if TYPE_CHECKING:``). The import
test imports every module *first*, in a process where no ``lebm_zoo`` module has been imported yet, which fails on an
import cycle at import time.
"""
from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lebm_zoo"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, *, module_level: bool):
    """``(target module, imported names, line)`` of each import of ``module``: absolute names, relative ones
    resolved. ``module_level``: only those that run at import time."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)) and module_level:
                continue
            if isinstance(node, ast.If) and module_level and _is_type_checking(node.test):
                yield from walk(node.orelse)
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, (), node.lineno
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                yield base, tuple(a.name for a in node.names), node.lineno
            yield from walk(list(ast.iter_child_nodes(node)))

    yield from walk(ast.parse(path.read_text(encoding="utf-8"), str(path)).body)


def _is_in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{line}"


# ------------------------------------------------------------------------------------------------ static checks
def test_the_package_is_found():
    assert {"lebm_zoo", "lebm_zoo.text", "lebm_zoo.checkpoint", "lebm_zoo.pretrained", "lebm_zoo.cli",
            "lebm_zoo.callbacks._common", "lebm_zoo.models.base", "lebm_zoo.models.language_model"} <= set(MODULES)


def test_no_module_of_lebm_zoo_imports_datamodules_at_module_level():
    bad = [f"{_where(m, line)}: {target}" for m in MODULES for target, _, line in _imports(m, module_level=True)
           if _is_in(target, "datamodules")]
    assert not bad, "lebm_zoo must not depend on the datamodules package at import time:\n" + "\n".join(bad)


def test_only_the_cli_imports_datamodules_at_all():
    """The CLI (the application on top of both) catches ``datamodules.DatasetNotFoundError``, imported lazily in
    ``main``; nothing else in the package reads the datamodules (the text format lives in ``lebm_zoo.text``)."""
    bad = [f"{_where(m, line)}: {target}" for m in MODULES if not _is_in(m, "lebm_zoo.cli")
           for target, _, line in _imports(m, module_level=False) if _is_in(target, "datamodules")]
    assert not bad, "\n".join(bad)


def test_callbacks_do_not_import_the_cli():
    bad = [f"{_where(m, line)}: {target} {names}" for m in MODULES if _is_in(m, "lebm_zoo.callbacks")
           for target, names, line in _imports(m, module_level=False)
           if _is_in(target, "lebm_zoo.cli") or (target == "lebm_zoo" and "cli" in names)]
    assert not bad, "\n".join(bad)


def test_callbacks_share_private_helpers_only_through_common():
    """A callback module takes another callback module's private names only from ``lebm_zoo.callbacks._common``."""
    bad = [f"{_where(m, line)}: from {target} import {', '.join(names)}" for m in MODULES
           if _is_in(m, "lebm_zoo.callbacks")
           for target, names, line in _imports(m, module_level=False)
           if _is_in(target, "lebm_zoo.callbacks") and target != "lebm_zoo.callbacks._common"
           and any(n.startswith("_") for n in names)]
    assert not bad, "\n".join(bad)


def test_no_module_reads_the_version_from_the_package_root():
    """The version lives in ``lebm_zoo._version``: a module that imports the package root for it (or anything, at
    import time) would see a partly initialised package."""
    bad = []
    for m in MODULES:
        if m == "lebm_zoo":
            continue
        for target, names, line in _imports(m, module_level=False):
            if target == "lebm_zoo" and "__version__" in names:
                bad.append(f"{_where(m, line)}: from lebm_zoo import __version__")
        for target, _, line in _imports(m, module_level=True):
            if target == "lebm_zoo":
                bad.append(f"{_where(m, line)}: imports the package root at import time")
        tree = ast.parse(MODULES[m].read_text(encoding="utf-8"))
        bad += [f"{_where(m, n.lineno)}: lebm_zoo.__version__" for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and n.attr == "__version__" and isinstance(n.value, ast.Name)
                and n.value.id == "lebm_zoo"]
    assert not bad, "\n".join(bad)


def _edges(module_level: bool = True) -> dict[str, set[str]]:
    """Import graph between lebm_zoo modules (``from pkg import sub`` -> ``pkg.sub`` when it is a module), of the
    module-level imports or of all of them (``module_level=False``: those inside functions too). The implicit import
    of a module's parent packages is left out: it is not a cycle."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, names, _ in _imports(m, module_level=module_level):
            if not _is_in(target, "lebm_zoo"):
                continue
            for name in names or [None]:
                sub = f"{target}.{name}"
                graph[m].add(sub if sub in MODULES else target)
    return graph


@pytest.mark.parametrize("module_level", [True, False], ids=["module level", "function level too"])
def test_imports_have_no_cycle(module_level):
    """Also catches a cycle that the order of the package ``__init__`` imports happens to hide today, and (issue 31)
    one closed by an import inside a function, which hides it from an import-time check."""
    graph, state, stack, cycles = _edges(module_level), {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                cycles.append(" -> ".join([*stack[stack.index(n):], n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# ------------------------------------------------------------------------------------------------ import test
_HARNESS = r"""
import importlib, json, os, sys, traceback

preload, names = json.loads(sys.argv[1])
for dep in preload:  # third-party modules only: they are not what is tested, and cost most of the import time
    try:
        importlib.import_module(dep)
    except Exception:
        pass
ours = [m for m in sys.modules if m.split(".")[0] in ("lebm_zoo", "datamodules")]
assert not ours, f"preloading imported {ours}"


def first(name):
    try:
        importlib.import_module(name)
        return ""
    except BaseException:
        return traceback.format_exc()


failures = {}
for name in names:
    if not hasattr(os, "fork"):
        failures[name] = "no os.fork: use one process per module"
        continue
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a child per module: a process that has imported nothing of lebm_zoo yet
        os.close(r)
        data = first(name).encode()
        while data:
            data = data[os.write(w, data):]
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if message or status:
        failures[name] = message or f"exit status {status}"
print(json.dumps(failures))
"""


def _third_party() -> list[str]:
    names = set()
    for m in MODULES:
        for target, _, _ in _imports(m, module_level=True):
            if target and not _is_in(target, "lebm_zoo") and not _is_in(target, "datamodules"):
                names.add(target)
    return sorted(names)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the import harness forks a fresh child per module")
def test_every_module_imports_first_on_its_own():
    """Each module of lebm_zoo, imported before any other lebm_zoo module (in a fresh subprocess: one forked child
    per module after the third-party libraries are loaded), imports without error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", _HARNESS, json.dumps([_third_party(), sorted(MODULES)])],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"import {name} first:\n{tb}" for name, tb in failures.items())


# ------------------------------------------------------------------------------------------------ public names
def test_public_errors():
    import lebm_zoo
    from lebm_zoo import errors
    from lebm_zoo.models import base

    assert lebm_zoo.DataShapeError is base.DataShapeError and issubclass(lebm_zoo.DataShapeError, ValueError)
    assert lebm_zoo.TrainingDivergedError is base.TrainingDivergedError
    # every error class lives in lebm_zoo.errors (issue 31); the modules that raise them import them from there
    defined = {n: c for m in MODULES if m != "lebm_zoo.errors" for n, c in vars(importlib.import_module(m)).items()
               if isinstance(c, type) and issubclass(c, BaseException) and c.__module__ == m}
    assert not defined, f"error classes outside lebm_zoo.errors: {sorted(defined)}"
    assert set(errors.__all__) >= {"DataShapeError", "TrainingDivergedError", "CheckpointError", "RecipeError",
                                   "FIDWeightsNotFoundError", "StoppedBySignal"}
    assert {"DataShapeError", "TrainingDivergedError", "CheckpointError"} <= set(lebm_zoo.__all__)


def test_text_helpers_round_trip_a_sentence_and_smiles():
    from lebm_zoo.text import SPECIALS, Vocabulary, pad_batch, tokenize, tokenize_smiles

    sentence = "the cat sat on the mat"
    vocab = Vocabulary.build([tokenize(sentence)])
    ids = vocab.encode(tokenize(sentence, vocab.sep))
    assert ids[0] == vocab.bos_index and ids[-1] == vocab.eos_index and vocab.decode(ids) == sentence
    assert Vocabulary.from_list(vocab.to_list(), vocab.sep) == vocab and tuple(vocab.to_list()[:4]) == SPECIALS
    assert vocab.decode(vocab.encode(["the", "dog"])) == "the <unk>"

    smiles = ["CC(=O)Oc1ccccc1C(=O)O", "c1ccc2[nH]ccc2c1", "ClC(Br)=O", "C1CC2CCC1C%10CC2%10"]
    assert tokenize_smiles("ClC(Br)=O") == ["Cl", "C", "(", "Br", ")", "=", "O"]
    mols = Vocabulary.build([tokenize(s, "") for s in smiles], sep="")
    batch = pad_batch([mols.encode(tokenize_smiles(s)) for s in smiles])
    assert batch["tokens"].shape == batch["mask"].shape and batch["mask"].sum(1).tolist() == [
        len(tokenize_smiles(s)) + 2 for s in smiles]
    assert mols.decode_batch(batch["tokens"]) == smiles
    with pytest.raises(ValueError, match="outside the SMILES alphabet"):
        tokenize("CC{O}", "")


def test_old_import_paths_still_work():
    import datamodules
    import datamodules.molecules
    import datamodules.text
    import lebm_zoo.callbacks.reconstruction
    import lebm_zoo.callbacks.samples
    import lebm_zoo.models.latent_sequence
    from lebm_zoo import text
    from lebm_zoo.callbacks import _common

    assert datamodules.Vocabulary is datamodules.text.Vocabulary is text.Vocabulary
    assert datamodules.text.pad_batch is text.pad_batch and datamodules.text.SPECIALS is text.SPECIALS
    assert datamodules.molecules.tokenize_smiles is text.tokenize_smiles
    assert datamodules.molecules.SMILES_REGEX is text.SMILES_REGEX
    assert lebm_zoo.models.latent_sequence.VocabularyMixin is text.VocabularyMixin
    assert lebm_zoo.callbacks.reconstruction._run_dir is _common._run_dir
    assert lebm_zoo.callbacks.samples._log_image is _common._log_image


def test_sequence_models_share_the_vocabulary_and_the_checkpoint_record():
    import lebm_zoo
    from lebm_zoo._version import __version__
    from lebm_zoo.text import Vocabulary, VocabularyMixin

    lm = lebm_zoo.LSTMLanguageModel(vocab=Vocabulary(["a", "b"]).to_list(), emb_dim=4, hidden=4)
    assert isinstance(lm, VocabularyMixin) and issubclass(lebm_zoo.SequenceLatentEBMPrior, VocabularyMixin)
    batch = lm.encode(["a b", "b z a"])
    assert batch["tokens"].tolist() == [[1, 4, 5, 2, 0], [1, 5, 3, 4, 2]]
    ckpt = {}
    lm.on_save_checkpoint(ckpt)
    assert ckpt["lebm_zoo"]["class_path"] == "lebm_zoo.models.language_model.LSTMLanguageModel"
    assert ckpt["lebm_zoo"]["version"] == __version__ and ckpt["lebm_zoo"]["recipe"] is None
    with pytest.raises(lebm_zoo.DataShapeError, match="no vocabulary yet"):
        lebm_zoo.LSTMLanguageModel(emb_dim=4, hidden=4).encode(["a"])
