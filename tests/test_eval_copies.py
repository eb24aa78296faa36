"""The evaluation scripts read checkpoints without importing training code, so they hold copies:
the text functions of nlp_similar_words.py (in linear_eval.py and bound.py) must be the same code,
the checkpoint/encoder/data helpers of linear_eval.py (in bound.py) VERBATIM copies, and the
one-line-error Parser the training scripts' harness class, verbatim.

The copies of other people's functions are compared as syntax trees (line breaks, comments and
the wrapping of docstrings may differ, since each file keeps its lines within 100 columns); the
copies within the evaluation scripts are compared character for character."""
import ast
import inspect
import textwrap

import pytest

import bound
import linear_eval

TEXT = ["tokenize", "clean_ag_news", "read_ag_news", "encode", "erase", "replace"]
EVAL = ["Documents", "TextAugment", "BagOfWords", "load_run", "load_state", "build_head", "Encoder",
        "build_encoder", "image_error", "build_data", "LabInput", "Parser"]


def code(source):
    """The syntax tree of a function's source, every string's whitespace collapsed (docstrings may
    wrap differently)."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = " ".join(node.value.split())
    return ast.dump(tree)


def code_of(obj):
    return code(inspect.getsource(obj))


def test_the_comparison_ignores_line_breaks_but_not_code():
    source = inspect.getsource(linear_eval.erase)
    wrapped = source.replace("(tokens.shape[0], dtype", "(tokens.shape[0],\n" + " " * 22 + "dtype")
    assert wrapped != source and code(wrapped) == code(source)
    assert code(source.replace(">= ratio", "> ratio")) != code(source)


@pytest.mark.parametrize("name", TEXT)
def test_text_functions_are_the_code_of_nlp_similar_words(name):
    import nlp_similar_words
    original = code_of(getattr(nlp_similar_words, name))
    assert code_of(getattr(linear_eval, name)) == original
    assert code_of(getattr(bound, name)) == original


@pytest.mark.parametrize("name", EVAL)
def test_checkpoint_helpers_are_verbatim_copies_of_linear_eval(name):
    assert inspect.getsource(getattr(bound, name)) == inspect.getsource(getattr(linear_eval, name))


def test_parser_is_the_shared_class():
    import simclr_debiased
    assert inspect.getsource(linear_eval.Parser) == inspect.getsource(simclr_debiased.Parser)
    # bound.py's sub-commands are parsed by the same class (add_subparsers uses type(parser))
    actions = [a for a in bound.get_parser()._actions if a.dest == "command"]
    assert {type(p) for p in actions[0].choices.values()} == {bound.Parser}
