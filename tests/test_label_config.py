import pytest

from backend.errors import UnsupportedLabelConfig
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
            "at least 2",
        ),
    ],
)
def test_unsupported_configs_say_why_and_name_the_supported_tags(xml, named):
    with pytest.raises(UnsupportedLabelConfig) as error:
        parse_label_config(xml)
    message = str(error.value)
    assert named in message
    assert "<Choices>" in message and "<Text>" in message
