"""Selection strings: official parsing of odd strings, formatting, and the 16 allowed ids from the real tokenizer."""
from __future__ import annotations

import pytest

from cogstream_jax.data import selection as sel

from real_processor_cache import real_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return real_tokenizer()


@pytest.mark.parametrize(
    "text,visual,indices",
    [
        ("[yes,0,5]", True, (0, 5)),
        ("[no,0,5]", False, (0, 5)),
        ("[no]", False, ()),
        ("[yes]", True, ()),
        ("[maybe,1]", True, (1,)),  # unknown head keeps visual and is not an index
        ("", True, ()),
        ("[]", True, ()),
        ("[,3]", True, (3,)),  # empty head: nothing dropped, empty item skipped
        ("[ no , 2 ]", False, (2,)),
        ("[[no,2]]", False, (2,)),  # strip('[]') removes every outer bracket
        ("[yes,a,2,3.5,4]", True, (2, 4)),  # non-integers skipped
        ("[7,1]", True, (7, 1)),
        ("[NO,1]", True, (1,)),  # case-sensitive
    ],
)
def test_parse_official_rules(text, visual, indices):
    parsed = sel.parse_selection(text)
    assert (parsed.if_visual, parsed.indices) == (visual, indices)


def test_resolve_and_relevance():
    choice = sel.Selection(True, (5, 1, 1, -1, -9))
    assert choice.resolve(3) == (1, 1, 2)  # out of range dropped, duplicates kept, -1 = last
    assert choice.relevance(3) == [0, 1, 0]


def test_postprocess_generated():
    assert sel.postprocess_generated("") == "[yes]"
    assert sel.postprocess_generated(" no,1 ") == "[no,1]"
    assert sel.postprocess_generated("[yes,2") == "[yes,2]"
    assert sel.postprocess_generated("1]") == "[1]"


def test_gt_selection_keeps_coi_order():
    assert sel.gt_selection(False, [3, 0]).format() == "[no,3,0]"
    assert sel.gt_selection(True, []).format() == "[yes]"


def test_allowed_token_ids_from_real_tokenizer(tokenizer):
    ids = sel.allowed_token_ids(tokenizer)
    assert ids == sel.ALLOWED_TOKEN_IDS and len(ids) == 16
    for target in ("[yes,0,5]<|im_end|>", "[no,12]<|im_end|>", "[no]<|im_end|>"):
        assert set(tokenizer.encode(target, add_special_tokens=False)) <= set(ids)
