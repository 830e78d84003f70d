import pytest

from backend.errors import UnsupportedLabelConfig
from backend.hypertext import visible_text
from backend.label_config import parse_label_config
from tests.conftest import AG_NEWS_CONFIG

MULTI = """<View><HyperText name="page" value="$html"/>
<Choices name="tags" toName="page" choice="multiple">
<Choice value="a" hint="about apples"/><Choice value="b"/></Choices>
</View>"""


def test_single_choice_config_is_read_in_order():
    config = parse_label_config(AG_NEWS_CONFIG)
    assert (config.from_name, config.to_name, config.data_key) == ("topic", "text", "text")
    assert config.labels == ("World", "Sports", "Business", "Sci/Tech")
    assert config.multi_label is False


def test_multiple_choice_over_hypertext_uses_hints_for_zero_shot():
    config = parse_label_config(MULTI)
    assert config.multi_label is True
    assert config.data_key == "html"
    assert config.label_descriptions == ("about apples", "b")


def test_the_document_class_is_found_among_other_choices():
    text = '<Text name="text" value="$text"/>'
    sentiment = '<Choices name="sentiment" toName="text"><Choice value="Positive"/><Choice value="Negative"/></Choices>'
    others = [
        # an entity-tagging config's attribute per region
        '<Labels name="ner" toName="text"><Label value="PER"/></Labels>'
        '<Choices name="attr" toName="text" perRegion="true"><Choice value="a"/><Choice value="b"/></Choices>',
        # a checkbox with one option
        '<Choices name="flag" toName="text"><Choice value="Offensive"/></Choices>',
        # a follow-up question shown only for one answer
        '<Choices name="reason" toName="text" visibleWhen="choice-selected" whenTagName="sentiment" '
        'whenChoiceValue="Negative"><Choice value="Price"/><Choice value="Quality"/></Choices>',
        # the same, the condition on a <View> around it
        '<View visibleWhen="choice-selected" whenTagName="sentiment" whenChoiceValue="Negative">'
        '<Choices name="reason" toName="text"><Choice value="Price"/><Choice value="Quality"/></Choices></View>',
    ]
    for other in others:
        assert parse_label_config(f"<View>{text}{other}{sentiment}</View>").from_name == "sentiment", other
    assert parse_label_config(f"<View>{text}{others[2]}{sentiment}</View>").other_choices == ("reason",)
    assert parse_label_config(f"<View>{text}{sentiment}</View>").other_choices == ()


def test_zero_shot_reads_a_choice_by_its_value_not_its_alias():
    xml = (
        '<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="Positive" alias="pos"/>'
        '<Choice value="Negative" alias="neg" hint="an unhappy review"/></Choices></View>'
    )
    config = parse_label_config(xml)
    assert config.labels == ("pos", "neg")  # what Label Studio stores in results
    assert config.label_descriptions == ("Positive", "an unhappy review")


def test_choices_nested_in_a_choice_are_not_labels_without_allow_nested():
    # without allowNested Label Studio neither shows nor stores a <Choice> nested in another: no class for it
    xml = (
        '<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="Sport">'
        '<Choice value="Football"/><Choice value="Tennis"/></Choice><Choice value="Politics" alias="pol"/>'
        "</Choices></View>"
    )
    config = parse_label_config(xml)
    assert config.labels == ("Sport", "pol")
    assert config.label_descriptions == ("Sport", "Politics")


def test_a_hypertext_task_is_read_as_the_annotator_sees_it():
    config = parse_label_config(MULTI)
    html = '<div class="x"><p>Fish &amp; <b>chips</b></p><script>track()</script><style>p {}</style>\n<p>daily</p>'
    assert config.text_of({"id": 1, "data": {"html": html}}) == "Fish & chips daily"
    assert config.text_of({"id": 2, "data": {"html": "<p>unclosed <i>tags"}}) == "unclosed tags"
    plain = parse_label_config(AG_NEWS_CONFIG)
    assert plain.text_of({"id": 3, "data": {"text": "<b>kept</b> as written"}}) == "<b>kept</b> as written"
    assert config.text_source != parse_label_config(MULTI.replace("HyperText", "Text")).text_source


@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("<p>fine</p><![ ]]>", "fine"),  # Python's html.parser raised AssertionError here: one task failed a batch
        ("<![foo[ <p>after</p>", "after"),
        ('<?xml version="1.0" encoding="utf-8"?><p>declared</p>', "declared"),
        ('<meta charset="latin-1"><p>café</p>', "café"),  # the text is already decoded: its own charset is moot
        ("before <!-- a comment --> after", "before after"),
        ("<p>a</p><p>b</p>", "a b"),
        # in the order a browser shows it: the text after a closing tag comes after that element's text
        ("<div><p>The food was <b>not</b> good</p> Overall: great</div>", "The food was not good Overall: great"),
        ("<ul><li><b>Pros:</b> fast</li></ul>Cons: none", "Pros: fast Cons: none"),
        ("un<b>believ</b>able, <td>cell</td><td>next</td>", "unbelievable, cell next"),  # inline vs block elements
        ("<button>Yes</button><button>No</button>Price:<input value=3>USD<center>.</center>", "Yes No Price: USD ."),
        ("<title>tab</title><p>page</p>x<script>var a;</script> y<!-- note -->z", "page x yz"),
        ("intro <p>para</p>" + "<div>" * 300 + "deep" + "</div>" * 300 + " outro", "intro para deep outro"),
        ("<!--" * 25_000, ""),  # 100 KB of unclosed comments: html.parser took 9 s, quadratic
        ("<p>shown</p><noscript>Please enable JavaScript</noscript>", "shown"),  # the editor runs scripts
        ('<div hidden><p>menu</p></div><span style="color: red; display : none">x</span>seen', "seen"),
        ('<div style="DISPLAY:NONE ! important">a</div><p style="display: block; --display:none">b</p>', "b"),
        # an inline display decides: the last one, unless an earlier one is !important
        ('<p style="display:none; display:block">a</p><p style="display:none!important;display:block">b</p>', "a"),
        ('<div hidden style="display: flex">shown</div>', "shown"),
        ('<body hidden style="display:none"><p>inline HyperText drops them</p></body>', "inline HyperText drops them"),
        ("a<div hidden>x</div>b", "ab"),
        ("", ""),
    ],
)
def test_any_hypertext_gives_its_visible_text(html, text):
    assert visible_text(html) == text


@pytest.mark.parametrize(("config", "data"), [(AG_NEWS_CONFIG, {"text": " \n\t"}), (MULTI, {"html": "<p> <br/></p>"})])
def test_a_blank_text_is_missing_since_there_is_nothing_to_predict_from(config, data):
    # a blank task ranked would be served first: the model is as unsure as it can be of nothing
    with pytest.raises(KeyError, match="blank"):
        parse_label_config(config).text_of({"id": 1, "data": data})


def test_the_text_field_may_be_a_path_into_nested_data():
    def config(value):
        return parse_label_config(AG_NEWS_CONFIG.replace('value="$text"', f'value="{value}"'))

    task = {"id": 1, "data": {"meta": {"text": "nested"}, "pages": [{"text": "first page"}], "a.b": "literal key"}}
    assert config("$meta.text").text_of(task) == "nested"  # as Label Studio's editor reads it (lodash get)
    assert config("$pages[0].text").text_of(task) == "first page"
    assert config("$a.b").text_of(task) == "literal key"  # a key holding the dots itself comes first
    assert config("$pages[²].text").text_of({"id": 2, "data": {"pages": {"²": {"text": "a key"}}}}) == "a key"
    huge = "9" * 5000  # past Python's limit on the digits int() reads: missing too, not a ValueError
    for missing in ("$meta.title", "$pages[1].text", "$text", "$pages[²].text", f"$pages[{huge}].text"):
        with pytest.raises(KeyError, match="has no data"):
            config(missing).text_of(task)


def test_a_value_mixing_words_and_fields_reads_as_the_editor_shows_it():
    config = parse_label_config(AG_NEWS_CONFIG.replace('value="$text"', 'value="$title: $meta.body."'))
    task = {"id": 1, "data": {"title": "Match report", "meta": {"body": "The team won 3-1"}}}
    assert config.text_of(task) == "Match report: The team won 3-1."
    # a missing or null field reads as empty: the task still has its body to predict from and rank
    assert config.text_of({"id": 2, "data": {"meta": {"body": "no title"}}}) == ": no title."
    assert config.text_of({"id": 2, "data": {"title": None, "meta": {"body": "no title"}}}) == ": no title."
    for nothing in ({}, {"title": None}, {"title": " ", "meta": {"body": ""}}):
        with pytest.raises(KeyError, match="none of its fields has text"):
            config.text_of({"id": 3, "data": nothing})
    single = parse_label_config(AG_NEWS_CONFIG.replace('value="$text"', 'value="Title: $title"'))
    assert single.text_of(task) == "Title: Match report"
    assert config.text_source != single.text_source  # another way of reading texts makes another pool


def test_a_null_text_is_missing_not_the_word_none():
    with pytest.raises(KeyError, match="has no data\\['text'\\]"):
        parse_label_config(AG_NEWS_CONFIG).text_of({"id": 1, "data": {"text": None}})


def test_result_has_label_studio_shape():
    config = parse_label_config(AG_NEWS_CONFIG)
    assert config.result(["Sports"]) == [
        {"from_name": "topic", "to_name": "text", "type": "choices", "value": {"choices": ["Sports"]}}
    ]
    assert config.result([]) == []  # multi-label with nothing above 0.5: no region, never an empty choice list


@pytest.mark.parametrize(
    ("xml", "named"),
    [
        (
            '<View><Image name="i" value="$img"/><RectangleLabels name="r" toName="i"><Label value="x"/>'
            "</RectangleLabels></View>",
            "RectangleLabels",
        ),
        (
            '<View><Image name="i" value="$img"/><Choices name="c" toName="i"><Choice value="x"/><Choice value="y"/>'
            "</Choices></View>",
            "Image",
        ),
        ("<View><oops", "not valid XML"),
        ("", "empty"),
        (
            '<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="only"/></Choices></View>',
            'at least 2 needed (a yes/no flag: add the "no" as a choice, e.g. <Choice value="Not only"/>)',
        ),
        (
            # the SDK reads a tag with both name and value as an object tag: "B" would be missing from the labels
            '<View><Text name="t" value="$t"/><Choices name="c" toName="t"><Choice value="A"/>'
            '<Choice name="b" value="B"/><Choice value="C"/></Choices></View>',
            "has <Choice> tags with a name attribute (e.g. name='b')",
        ),
        (
            '<View><Labels name="ner" toName="t"><Label value="PER"/></Labels><Text name="t" value="$t"/>'
            '<Choices name="c" toName="t" perRegion="true"><Choice value="a"/><Choice value="b"/></Choices></View>',
            'per region (perRegion="true")',
        ),
        (
            '<View><Text name="t" value="$url" valueType="url"/><Choices name="c" toName="t"><Choice value="a"/>'
            '<Choice value="b"/></Choices></View>',
            'loads its text from a URL (valueType="url")',
        ),
        (
            # the editor decodes such texts before it shows them; the backend would classify the base64
            '<View><Text name="t" value="$t" encoding="base64unicode"/><Choices name="c" toName="t">'
            '<Choice value="a"/><Choice value="b"/></Choices></View>',
            'encoding="base64unicode"',
        ),
        (
            '<View><Text name="t" value="a constant"/><Choices name="c" toName="t"><Choice value="a"/>'
            '<Choice value="b"/></Choices></View>',
            "with no $field to read the text from",
        ),
        (
            '<View><Repeater on="$items"><Text name="t_{{idx}}" value="$items[{{idx}}].text"/>'
            '<Choices name="c_{{idx}}" toName="t_{{idx}}"><Choice value="a"/><Choice value="b"/></Choices>'
            "</Repeater></View>",
            "a <Repeater> template",
        ),
        (
            # Label Studio stores every choice of such a <Choices> as a path (a list), even in a flat list
            '<View><Text name="t" value="$t"/><Choices name="c" toName="t" allowNested="true"><Choice value="a"/>'
            '<Choice value="b"/></Choices></View>',
            'allowNested="true"',
        ),
        (
            '<View><Text name="t" value="$t"/><Choices name="c" toName="t" value="$options"/></View>',
            'takes its choices from the task data (value="$options")',
        ),
        (
            '<View><text name="t" value="$t"/><choices name="c" toName="t"><choice value="a"/><choice value="b"/>'
            "</choices></View>",
            "tag names are case-sensitive",
        ),
        (
            # the SDK does not count a tag without toName as a control: the message must not say "no <Choices>"
            '<View><Text name="t" value="$t"/><Choices name="c"><Choice value="a"/><Choice value="b"/>'
            "</Choices></View>",
            "<Choices name='c'> has no toName",
        ),
        (
            '<View><Text name="t" value="$t"/><Choices toName="t"><Choice value="a"/><Choice value="b"/>'
            "</Choices></View>",
            "<Choices toName='t'> has no name",
        ),
    ],
)
def test_unsupported_configs_say_why_and_name_the_supported_tags(xml, named):
    with pytest.raises(UnsupportedLabelConfig) as error:
        parse_label_config(xml)
    message = str(error.value)
    assert named in message
    assert "<Choices>" in message and "<Text>" in message


@pytest.mark.parametrize(
    "xml, named",
    [
        (
            '<View><Labels name="ner" toName="t"><Label value="PER"/></Labels><Text name="t" value="$t"/>'
            '<Choices name="c" toName="t" perregion="true"><Choice value="a"/><Choice value="b"/></Choices></View>',
            "per region",
        ),
        (
            '<View><Text name="t" value="$url" valuetype="url"/><Choices name="c" toName="t"><Choice value="a"/>'
            '<Choice value="b"/></Choices></View>',
            "loads its text from a URL",
        ),
    ],
)
def test_attributes_are_read_in_any_case_as_the_editor_reads_them(xml, named):
    with pytest.raises(UnsupportedLabelConfig, match=named):
        parse_label_config(xml)


def test_a_lower_case_condition_or_choice_attribute_counts_too():
    text = '<Text name="text" value="$text"/>'
    sentiment = '<Choices name="sentiment" toName="text"><Choice value="Pos"/><Choice value="Neg"/></Choices>'
    for condition in (
        '<Choices name="reason" toName="text" visiblewhen="choice-selected" whenTagName="sentiment">'
        '<Choice value="Price"/><Choice value="Quality"/></Choices>',
        '<View visiblewhen="choice-selected" whenTagName="sentiment"><Choices name="reason" toName="text">'
        '<Choice value="Price"/><Choice value="Quality"/></Choices></View>',
    ):
        assert parse_label_config(f"<View>{text}{condition}{sentiment}</View>").from_name == "sentiment", condition
    multiple = sentiment.replace('toName="text">', 'toName="text" CHOICE="multiple">')
    assert parse_label_config(f"<View>{text}{multiple}</View>").multi_label is True


def test_a_config_without_any_control_tag_says_so():
    with pytest.raises(UnsupportedLabelConfig, match=r"it has no control tag \(no <Choices>"):
        parse_label_config('<View><Text name="text" value="$text"/></View>')


def test_parsed_configs_are_kept_by_digest_most_recently_used_first(monkeypatch):
    from backend import label_config

    monkeypatch.setattr(label_config, "PARSED_CONFIGS", 2)
    monkeypatch.setattr(label_config, "_parsed", type(label_config._parsed)())
    configs = [AG_NEWS_CONFIG.replace('value="World"', f'value="World {i}"') for i in range(3)]
    first = parse_label_config(configs[0])
    assert parse_label_config(configs[0]) is first  # parsed once
    second = parse_label_config(configs[1])
    parse_label_config(configs[0])  # used again: the oldest is now configs[1]
    parse_label_config(configs[2])
    assert parse_label_config(configs[0]) is first and len(label_config._parsed) == 2
    assert all(isinstance(key, bytes) and len(key) == 16 for key in label_config._parsed)  # digests, not the XML
    assert parse_label_config(configs[1]) is not second  # it was dropped, and is parsed again
