"""The evaluation scripts read checkpoints without importing training code, so they hold VERBATIM
copies: the text functions of nlp_similar_words.py (in linear_eval.py and bound.py) and the
checkpoint/encoder/data helpers of linear_eval.py (in bound.py). Each copy must stay identical."""
import inspect

import pytest

import bound
import linear_eval
import nlp_similar_words

TEXT = ["tokenize", "clean_ag_news", "read_ag_news", "encode", "erase", "replace"]
EVAL = ["Documents", "TextAugment", "BagOfWords", "load_run", "build_head", "Encoder", "build_encoder", "build_data",
        "LabInput", "rgb_to_lab"]


@pytest.mark.parametrize("name", TEXT)
def test_text_functions_are_verbatim_copies_of_nlp_similar_words(name):
    original = inspect.getsource(getattr(nlp_similar_words, name))
    assert inspect.getsource(getattr(linear_eval, name)) == original
    assert inspect.getsource(getattr(bound, name)) == original


def test_lab_conversion_is_ring_nces():
    import ring_nce
    assert inspect.getsource(linear_eval.rgb_to_lab) == inspect.getsource(ring_nce.rgb_to_lab)


@pytest.mark.parametrize("name", EVAL)
def test_checkpoint_helpers_are_verbatim_copies_of_linear_eval(name):
    assert inspect.getsource(getattr(bound, name)) == inspect.getsource(getattr(linear_eval, name))
