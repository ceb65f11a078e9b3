"""IAM's exact on-disk format: XML (entities, ISO-8859-1), lines.txt, split lists, crops."""

import os

import numpy as np
import pytest

from htr_dist.data import iam

FORM_XML = """<?xml version="1.0" encoding="ISO-8859-1"?>
<form created="2000-01-01" height="300" id="a01-000u" width="400" writer-id="000">
<machine-printed-part>
<machine-print-line text="A MOVE to stop Mr. Gaitskell"/>
</machine-printed-part>
<handwritten-part>
<line asx="10" asy="10" dsx="200" dsy="60" id="a01-000u-00" segmentation="ok" text="&amp;quot;Caf\xe9&amp;quot; &amp;amp; co's" threshold="154">
<word id="a01-000u-00-00" tag="NN" text="&amp;quot;Caf\xe9&amp;quot;">
<cmp height="20" width="30" x="40" y="50"/>
<cmp height="25" width="20" x="75" y="45"/>
</word>
<word id="a01-000u-00-01" tag="CC" text="&amp;amp;">
<cmp height="10" width="10" x="120" y="52"/>
</word>
</line>
<line id="a01-000u-01" segmentation="err" text="" threshold="154">
</line>
<line id="a01-000u-02" segmentation="ok" text="no boxes" threshold="154">
<word id="a01-000u-02-00" tag="NN" text="no"/>
</line>
</handwritten-part>
</form>
"""

LINES_TXT = """#--- lines.txt ---------------------------------------------------------------#
#
# format: a01-000u-00 ok 154 19 408 746 1661 89 A|MOVE|to|stop|Mr.|Gaitskell|from
#
a01-000u-00 ok 154 19 408 746 1661 89 A|MOVE|to|stop|Mr.|Gaitskell|from
a01-000u-01 err 156 3 395 932 1850 105 Labour|life|Peers|is
"""


ESCAPED_ONCE = {"&amp;quot;": "&quot;", "&amp;amp;": "&amp;"}
"""FORM_XML as a tool that escapes once would write it (IAM's own files escape twice)."""


@pytest.fixture(params=["iam", "escaped_once"])
def xml_path(tmp_path, request):
    text = FORM_XML
    if request.param == "escaped_once":
        for twice, once in ESCAPED_ONCE.items():
            text = text.replace(twice, once)
        assert "&amp;quot;" not in text and "&quot;" in text
    path = tmp_path / "a01-000u.xml"
    path.write_bytes(text.encode("latin-1"))  # IAM's XML is ISO-8859-1, as declared
    return str(path)


def test_parse_form_xml_entities_latin1_and_boxes(xml_path):
    form = iam.parse_form_xml(xml_path)
    assert form.id == "a01-000u" and form.writer_id == "000"
    assert [l.id for l in form.lines] == ["a01-000u-00"]
    line = form.lines[0]
    assert line.text == "\"Café\" & co's"  # IAM's double escaping decoded; once-escaped XML reads the same
    assert form.texts == {"a01-000u-00": line.text, "a01-000u-01": "", "a01-000u-02": "no boxes"}
    assert line.bbox == (40, 45, 130, 70)  # union of the three cmp boxes, exclusive right/bottom
    assert len(form.problems) == 2
    assert "a01-000u-01: empty transcription" in form.problems[0]
    assert "a01-000u-02: no <cmp> boxes" in form.problems[1]
    assert all(xml_path in p for p in form.problems)


def test_malformed_xml_names_the_file(tmp_path):
    bad = tmp_path / "b01-000.xml"
    bad.write_text("<form id='b01-000'><handwritten-part><line></form>")
    with pytest.raises(iam.IAMFormatError, match=r"b01-000.xml: malformed XML"):
        iam.parse_form_xml(str(bad))


def test_lines_txt(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text(LINES_TXT)
    lines = iam.parse_lines_txt(str(path))
    assert [l.id for l in lines] == ["a01-000u-00", "a01-000u-01"]
    assert lines[0].text == "A MOVE to stop Mr. Gaitskell from"
    assert lines[0].bbox == (408, 746, 408 + 1661, 746 + 89)
    assert lines[1].segmentation == "err" and lines[1].form_id == "a01-000u"
    path.write_text(LINES_TXT + "a01-000u-02 ok 154 x 1 2 3\n")
    with pytest.raises(iam.IAMFormatError, match=r"lines.txt:7: expected 9 fields"):
        iam.parse_lines_txt(str(path))


def test_duplicate_line_ids_name_file_and_id(tmp_path, xml_path):
    path = tmp_path / "lines.txt"
    path.write_text(LINES_TXT + "a01-000u-00 ok 154 19 408 746 1661 89 A|MOVE\n")
    with pytest.raises(iam.IAMFormatError, match=r"lines.txt:7: line id a01-000u-00 is already listed on line 5"):
        iam.parse_lines_txt(str(path))
    twice = FORM_XML.replace('id="a01-000u-02"', 'id="a01-000u-00"')
    with open(xml_path, "wb") as f:
        f.write(twice.encode("latin-1"))
    with pytest.raises(iam.IAMFormatError, match=r"a01-000u.xml: line id a01-000u-00 appears twice"):
        iam.parse_form_xml(xml_path)


def test_iam_task_line_lists(tmp_path):
    """IAM's own line recognition task lists (line ids, .txt); both validation sets are val; one kind per folder."""
    (tmp_path / "trainset.txt").write_text("a01-000u-00\na01-000u-02\n")
    (tmp_path / "validationset1.txt").write_text("b02-000-00\n")
    (tmp_path / "validationset2.txt").write_text("b02-001-03\n")
    (tmp_path / "testset.txt").write_text("c03-000-01\n\n")
    (tmp_path / "README.txt").write_text("not a list\n")  # only the task's own file names are read
    assert iam.read_split_lists(str(tmp_path)) == {"a01-000u-00": "train", "a01-000u-02": "train",
                                                   "b02-000-00": "val", "b02-001-03": "val", "c03-000-01": "test"}
    (tmp_path / "testset.txt").write_text("b02-000-00\n")  # a line in two lists is named as a line
    with pytest.raises(iam.IAMFormatError, match=r"testset.txt: line b02-000-00 is already in split 'val'"):
        iam.read_split_lists(str(tmp_path))
    (tmp_path / "testset.txt").write_text("c03-000-01\n")
    (tmp_path / "test.uttlist").write_text("c03-001\n")
    with pytest.raises(iam.IAMFormatError, match=r"name both lines \(a01-000u-00 in .*trainset.txt\) and forms "
                                                 r"\(c03-001 in .*test.uttlist\); use lists of one kind"):
        iam.read_split_lists(str(tmp_path))


def test_split_lists(tmp_path):
    (tmp_path / "train.uttlist").write_text("a01-000u\na01-003\n")
    (tmp_path / "validation.uttlist").write_text("b02-000\n")
    (tmp_path / "test.uttlist").write_text("c03-000\n\n")
    assert iam.read_split_lists(str(tmp_path)) == {"a01-000u": "train", "a01-003": "train", "b02-000": "val",
                                                   "c03-000": "test"}
    (tmp_path / "test.uttlist").write_text("a01-003\n")
    with pytest.raises(iam.IAMFormatError, match="train.uttlist: form a01-003 is already in split 'test'"):
        iam.read_split_lists(str(tmp_path))


def test_crop_line_margin_clip_and_scale():
    form = np.arange(100 * 200, dtype=np.uint32).reshape(100, 200).astype(np.uint8)
    crop = iam.crop_line(form, (40, 45, 130, 70), margin=8)
    assert crop.shape == (70 + 8 - 37, 130 + 8 - 32)
    assert np.array_equal(crop, form[37:78, 32:138])
    edge = iam.crop_line(form, (0, 0, 10, 10), margin=8)  # clipped at the form's border
    assert edge.shape == (18, 18)
    half = iam.crop_line(form, (40, 45, 130, 70), margin=8, scale=0.5)
    assert half.shape == (20, 53)


def test_find_form_image_in_iam_folders(tmp_path):
    os.makedirs(tmp_path / "formsE-H")
    (tmp_path / "formsE-H" / "e01-000.png").write_bytes(b"x")
    assert iam.find_form_image(str(tmp_path), "e01-000").endswith("formsE-H/e01-000.png")
    assert iam.find_form_image(str(tmp_path), "a01-000") is None
