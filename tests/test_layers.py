"""Layer selections: the syntax of train --layer and sweep --layers, and what records keep."""
import pytest

from ser_cache.errors import OptionError
from ser_cache.layers import (as_selection, dir_name, label, parse_cells, parse_selection, parse_states,
                              sort_key, states_of, to_json)


def test_train_takes_one_selection():
    assert parse_selection("4", 7) == 4
    assert parse_selection("all", 4) == (0, 1, 2, 3)
    assert parse_selection("2-5", 7) == parse_selection("2+3+4+5", 7) == parse_selection("[2-5]", 7) == (2, 3, 4, 5)
    assert parse_selection("6,2,4", 7) == parse_selection("2+4+6", 7) == (2, 4, 6)
    assert parse_selection("3+3", 7) == 3  # one state: the single-layer case


def test_sweep_cells_keep_their_old_meaning_and_add_multi_layer_cells():
    assert parse_cells("all", 4) == [0, 1, 2, 3]  # every state its own cell, as before
    assert parse_cells("2-5", 7) == [2, 3, 4, 5]  # a range of single cells, as before
    assert parse_cells("0,3,6", 7) == [0, 3, 6]
    assert parse_cells("all,2+3,3,[1-3],[2,3]", 4) == [0, 1, 2, 3, (1, 2, 3), (2, 3)]
    assert parse_cells("0-1+5", 7) == [(0, 1, 5)] and parse_cells("[all]", 3) == [(0, 1, 2)]
    assert parse_cells("[4]", 7) == [4]


@pytest.mark.parametrize("spec, fix", [
    ("2-x", r"'2-x' is not a state or range; write cells separated by commas"),
    ("5-2", r"write the lower state first, e\.g\. 2-5"),
    ("[2-5", r"close the bracket, e\.g\. \[2-5\]"),
    ("2-5]", r"a '\]' without its '\['"),
    ("[[2]]", r"brackets do not nest"),
    ("all+3", r"'all' stands alone, e\.g\. \[all\]"),
    ("2,,3", r"an empty item"),
    ("[2]+3", r"brackets go around a whole selection"),
])
def test_sweep_cell_errors_name_the_fix(spec, fix):
    with pytest.raises(OptionError, match=fix):
        parse_cells(spec, 7)


def test_train_and_extract_errors_name_the_fix():
    with pytest.raises(OptionError, match=r"--layer '2:5'.*or several for one multi-layer head: all, a range 2-5"):
        parse_selection("2:5", 7)
    with pytest.raises(OptionError, match=r"this model has states 0\.\.6"):
        parse_states("0,7", 7)
    assert parse_states("0,2-3", 5) == [0, 2, 3]


def test_records_keep_one_state_as_an_int():
    assert to_json(4) == 4 and to_json((2, 3)) == [2, 3] and as_selection([3, 2]) == (2, 3)
    assert states_of(4) == [4] and states_of([2, 3]) == [2, 3]
    assert label(4) == "4" and label((2, 3, 4)) == "2+3+4"
    assert parse_selection(label((2, 3, 4)), 7) == (2, 3, 4)  # a label is typed back as it reads
    assert dir_name(4) == "layer_04" and dir_name((2, 10)) == "layers_02+10"
    assert sorted([(1, 2), 5, 0, (0, 3)], key=sort_key) == [0, 5, (0, 3), (1, 2)]
