"""Understand a Label Studio labeling config: which `Choices` to predict, over which text field.

Parsing is done by the SDK's `LabelInterface`; this module only checks that the config is a text
classification and reads out what the rest of the backend needs.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace

import lxml.etree
from label_studio_sdk.label_interface import LabelInterface

from backend.errors import UnsupportedLabelConfig
from backend.hypertext import HYPERTEXT_READING, visible_text

TEXT_OBJECT_TAGS = ("Text", "HyperText")
MULTIPLE_CHOICE = "multiple"


@dataclass(frozen=True)
class ClassificationConfig:
    """A `<Choices>` control over a text object: everything prediction and training need."""

    from_name: str
    """Name of the `<Choices>` tag (the `from_name` of results)."""
    to_name: str
    """Name of the `<Text>`/`<HyperText>` tag (the `to_name` of results)."""
    data_key: str
    """Key of the task's `data` holding the text (the object's `value` without its `$`); for a template value that
    mixes words and fields (`"$title: $body"`), the whole value."""
    labels: tuple[str, ...]
    """Choice values, in config order; this order is the column order of every probability matrix."""
    label_descriptions: tuple[str, ...]
    """Per label, the text used for zero-shot: its `hint` when given, else its `value` (not the alias)."""
    multi_label: bool
    """True for `choice="multiple"` (sigmoid head), False for single choice (softmax head)."""
    object_tag: str = "Text"
    """`Text` or `HyperText`: a HyperText task's markup is stripped, the model reads what the annotator sees."""
    templated: bool = False
    """True when `data_key` is a template: each `$field` in it is replaced by the task's value, as the editor does."""
    other_choices: tuple[str, ...] = ()
    """Names of the config's other `<Choices>` tags: this backend predicts and ranks by one; they get nothing."""

    @property
    def text_source(self) -> str:
        """Where and how texts are read from a task: a config that reads them otherwise makes another pool."""
        reading = f"/{HYPERTEXT_READING}" if self.object_tag == "HyperText" else ""
        return f"{self.object_tag}{reading}:{self.data_key}"

    def result(self, chosen: list[str]) -> list[dict]:
        """Label Studio `result` regions for the chosen labels (one region, as the editor itself writes it).

        None chosen (multi-label, every p < 0.5) is no region at all, as an annotator who chose nothing leaves it.
        """
        if not chosen:
            return []
        return [
            {
                "from_name": self.from_name,
                "to_name": self.to_name,
                "type": "choices",
                "value": {"choices": list(chosen)},
            }
        ]

    def choices_in(self, result: object) -> tuple[str, ...]:
        """The labels a Label Studio `result` holds for this config's `<Choices>` (the inverse of `result`): those
        of its first region that has any; other controls' regions and unknown values are left out."""
        for choices in self._choice_lists(result):
            known = tuple(choice for choice in choices or () if choice in self.labels)
            if known:
                return known
        return ()

    def chose_nothing(self, result: object) -> bool:
        """True when a `result` holds no choice at all for this config's `<Choices>` (known or not): with
        `choice="multiple"` that is an annotation saying that none of the labels applies."""
        return isinstance(result, list) and all(choices == [] for choices in self._choice_lists(result))

    def _choice_lists(self, result: object) -> Iterator[list[str] | None]:
        """The `choices` list of each region of `result` that belongs to this config's `<Choices>`, or None for a
        region of another shape, which says nothing (Label Studio stores any list as a result: an import or an
        API call may hold `"value": ["A"]` or `"choices": "A"`)."""
        for region in result if isinstance(result, list) else ():
            if isinstance(region, dict) and region.get("from_name") == self.from_name:
                value = region.get("value") or {}
                choices = (value.get("choices") or []) if isinstance(value, dict) else None
                yield [choice for choice in choices if isinstance(choice, str)] if isinstance(choices, list) else None

    def text_of(self, task: dict) -> str:
        """The text a task carries for this config; raise KeyError naming the data key when it is missing, null or
        blank (nothing but white space, or HyperText with no visible text: there is nothing to predict from).

        The key may be a path into nested data, as Label Studio reads `value="$meta.text"` or `$pages[0].text`
        (a key holding the dots itself comes first); a template value (`"$title: $body"`) reads each of its fields,
        a missing or null one as empty, and has no text when none of them has any.
        Lone surrogates (valid in JSON's \\uXXXX escapes, not in UTF-8) become "?", so the tokenizer never refuses a
        text and one odd task never fails a whole batch.
        """
        if self.templated:
            text = _template_text(task, self.data_key)
        else:
            text = _field_text(task, self.data_key)
        text = text.encode("utf-8", errors="replace").decode("utf-8")
        if self.object_tag == "HyperText":
            text = visible_text(text)
        if not text.strip():
            raise KeyError(f"task {task.get('id')!r} has no text to read in data[{self.data_key!r}]: it is blank")
        return text


FIELD = re.compile(r"\$([\w\[\]]+(?:\.[\w\[\]]+)*)")
"""A `$field` in an object's `value`, a key or a path into nested data (`$meta.text`, `$pages[0].text`); a dot
that ends it (`"Title: $title."`) is the sentence's."""


def _template_text(task: dict, template: str) -> str:
    """`template` with each `$field` replaced by the task's text there, a missing or null one by nothing (a
    task with a body and no title still has its body to read); KeyError when no field has any text."""
    fields = {key: data_value(task.get("data"), key) for key in FIELD.findall(template)}
    texts = {key: "" if value is None else _as_text(value) for key, value in fields.items()}
    if not any(text.strip() for text in texts.values()):
        raise KeyError(f"task {task.get('id')!r} has no data[{template!r}]: none of its fields has text")
    return FIELD.sub(lambda field: texts[field.group(1)], template)


def _field_text(task: dict, key: str) -> str:
    """The task's `data` value at `key` as text; KeyError naming the key when it is missing or null."""
    value = data_value(task.get("data"), key)
    if value is None:
        raise KeyError(f"task {task.get('id')!r} has no data[{key!r}]")
    return _as_text(value)


def _as_text(value: object) -> str:
    return value if isinstance(value, str) else str(value)


def data_value(data: object, key: str) -> object:
    """`data[key]`, or the value at the path `key` names (`meta.text`, `pages[0].text`), or None."""
    if not isinstance(data, dict):
        return None
    if key in data:
        return data[key]
    value = data
    for step in re.findall(r"[^.\[\]]+", key):
        if isinstance(value, dict):
            value = value.get(step)
        elif isinstance(value, list) and (index := _index(step)) < len(value):
            value = value[index]
        else:
            return None
    return value


def _index(step: str) -> int:
    """A path step as a list index, or a number past any list's end for one that is not (`pages[²]`, a key; or too
    many digits for int() to read)."""
    return int(step) if step.isascii() and step.isdigit() and len(step) < 19 else 2**63


PARSED_CONFIGS = 256
"""How many parsed configs `parse_label_config` keeps (the most recently used)."""
_parsed: OrderedDict[bytes, ClassificationConfig] = OrderedDict()
_parsed_lock = threading.Lock()


def parse_label_config(label_config: str) -> ClassificationConfig:
    """Parse `label_config` XML into a `ClassificationConfig`, or raise `UnsupportedLabelConfig` saying why.

    Cached: Label Studio sends the same config with every `/setup` and `/predict`. Keyed by a digest, not by the
    text, so that the cache holds parsed configs only, not up to 256 request bodies' worth of XML.
    """
    if not isinstance(label_config, str):
        raise UnsupportedLabelConfig(f"the label config must be XML text, got {type(label_config).__name__}")
    key = hashlib.blake2b(label_config.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    with _parsed_lock:
        if key in _parsed:
            _parsed.move_to_end(key)
            return _parsed[key]
    config = _parse_label_config(label_config)
    with _parsed_lock:
        _parsed[key] = config
        while len(_parsed) > PARSED_CONFIGS:
            _parsed.popitem(last=False)
    return config


def _parse_label_config(label_config: str) -> ClassificationConfig:
    if not label_config.strip():
        raise UnsupportedLabelConfig("the label config is empty")
    try:
        interface = LabelInterface(label_config)
    except Exception as exc:  # the SDK raises several XML error types
        raise UnsupportedLabelConfig(f"the label config is not valid XML ({exc})") from None

    controls = list(interface.controls)
    choices = [control for control in controls if control.tag == "Choices"]
    tree = _xml_tree(label_config)
    if not choices:
        for element in tree.iter("Choices") if tree is not None else ():  # the SDK counts only a tag with both
            if not element.get("toName"):
                raise UnsupportedLabelConfig(
                    f"<Choices name={element.get('name', '')!r}> has no toName: it must name the <Text> or "
                    "<HyperText> it labels"
                )
            if not element.get("name"):
                raise UnsupportedLabelConfig(f"<Choices toName={element.get('toName')!r}> has no name")
        tags = sorted({control.tag for control in controls})
        if not tags:
            raise UnsupportedLabelConfig("it has no control tag (no <Choices>, nothing to label with)")
        case = " (tag names are case-sensitive: <Choices>, <Choice>, <Text>)" if "choices" in tags else ""
        raise UnsupportedLabelConfig(f"found control tags {', '.join(tags)} but no <Choices>{case}")
    # the document's class: a <Choices> shown for the whole text before one shown only on a condition
    conditional = _conditional_choices(tree, choices)
    reasons = []
    for control in sorted(choices, key=lambda control: control.name in conditional):
        try:
            config = _config_from_choices(control, tree)
        except UnsupportedLabelConfig as unsupported:
            reasons.append(unsupported.reason)
            continue
        return replace(config, other_choices=tuple(other.name for other in choices if other is not control))
    raise UnsupportedLabelConfig("; ".join(reasons))


def _xml_tree(label_config: str) -> lxml.etree._Element | None:
    """The config's element tree (LabelInterface parsed it already, but keeps no parents); None if lxml refuses."""
    try:
        return lxml.etree.fromstring(label_config.encode("utf-8"), parser=safe_xml_parser())
    except lxml.etree.XMLSyntaxError:
        return None


def _conditional_choices(tree: lxml.etree._Element | None, choices: list) -> set[str]:
    """Names of the `<Choices>` shown only on a condition: with `visibleWhen`, or inside a `<View>` that has it."""
    own = {control.name for control in choices if "visiblewhen" in _attributes(control)}
    if tree is None:
        return own
    inside = {
        str(element.get("name"))
        for element in tree.iter("Choices")
        if any("visiblewhen" in map(str.lower, ancestor.attrib) for ancestor in element.iterancestors())
    }
    return own | inside


def _nested_choices(tree: lxml.etree._Element | None, name: str) -> set[str]:
    """The labels (alias, else value) of `<Choice>` tags nested in another `<Choice>` of the `<Choices>` `name`,
    and nowhere else in it: without `allowNested` Label Studio neither shows them nor stores them in results."""
    if tree is None:
        return set()
    choices = [element for element in tree.iter("Choices") if element.get("name") == name]

    def labels(path: str) -> set[str]:
        return {
            str(choice.get("alias") or choice.get("value"))
            for element in choices
            for choice in element.xpath(path)
            if choice.get("alias") or choice.get("value")
        }

    return labels(".//Choice[ancestor::Choice]") - labels(".//Choice[not(ancestor::Choice)]")


def _named_choices(tree: lxml.etree._Element | None, name: str) -> list[str]:
    """The name attributes of the `<Choice>` tags of the `<Choices>` `name`."""
    if tree is None:
        return []
    return [
        str(choice.get("name"))
        for element in tree.iter("Choices")
        if element.get("name") == name
        for choice in element.iter("Choice")
        if choice.get("name")
    ]


def safe_xml_parser() -> lxml.etree.XMLParser:
    """A parser that expands no entities and fetches nothing; one per call (lxml's parsers are not for sharing
    between threads)."""
    return lxml.etree.XMLParser(resolve_entities=False, no_network=True)


def _config_from_choices(control, tree: lxml.etree._Element | None) -> ClassificationConfig:
    """The config for one `<Choices>` control; raise `UnsupportedLabelConfig` saying why it does not classify a
    whole text."""
    name = f"<Choices name={control.name!r}>"
    attributes = _attributes(control)
    if attributes.get("perregion", "").lower() == "true":
        raise UnsupportedLabelConfig(f'{name} is per region (perRegion="true"), not for the whole text')
    if attributes.get("allownested", "").lower() == "true":
        raise UnsupportedLabelConfig(
            f'{name} has allowNested="true", so Label Studio stores each choice as a path (a list of values), not '
            "as the value this backend predicts and learns from; remove allowNested"
        )
    text_objects = [obj for obj in control.objects if obj.tag in TEXT_OBJECT_TAGS]
    if not text_objects:
        targets = ", ".join(sorted({obj.tag for obj in control.objects})) or "nothing"
        raise UnsupportedLabelConfig(f"{name} points at {targets}, not at <Text> or <HyperText>")
    named = _named_choices(tree, control.name)
    if named:  # the SDK takes a tag with both a name and a value for an object tag: that choice would be missing
        raise UnsupportedLabelConfig(
            f"{name} has <Choice> tags with a name attribute (e.g. name={named[0]!r}), which Label Studio's SDK "
            "does not read as choices; remove name= from the <Choice> tags (the editor ignores it)"
        )
    nested = _nested_choices(tree, control.name)
    labels = tuple(label for label in control.labels if label not in nested)
    if len(labels) < 2:
        dynamic = attributes.get("value", "")
        if dynamic.startswith("$"):  # the options are read from each task's data
            raise UnsupportedLabelConfig(
                f'{name} takes its choices from the task data (value="{dynamic}"), so they differ between tasks and '
                "no model can learn them; list the labels as <Choice> tags"
            )
        flag = f' (a yes/no flag: add the "no" as a choice, e.g. <Choice value="Not {labels[0]}"/>)' if labels else ""
        raise UnsupportedLabelConfig(f"{name} has {len(labels)} distinct <Choice> label(s); at least 2 needed{flag}")
    text_object = text_objects[0]
    value = text_object.value or ""
    described = f"<{text_object.tag} name={text_object.name!r}> has value={value!r}"
    if "{{" in value:
        raise UnsupportedLabelConfig(f"{described}, a <Repeater> template; classify one text per task instead")
    if not FIELD.search(value):
        raise UnsupportedLabelConfig(f"{described}, with no $field to read the text from")
    text_attributes = _attributes(text_object)
    if text_attributes.get("valuetype", "").lower() == "url":
        raise UnsupportedLabelConfig(
            f'<{text_object.tag} name={text_object.name!r}> loads its text from a URL (valueType="url"), which the '
            "backend does not fetch; import the texts themselves"
        )
    encoding = text_attributes.get("encoding", "none")
    if encoding != "none":
        raise UnsupportedLabelConfig(
            f'<{text_object.tag} name={text_object.name!r}> has encoding="{encoding}", whose texts the editor decodes '
            "and the backend does not; import the texts themselves"
        )
    templated = not FIELD.fullmatch(value)  # words around the field(s), or more than one field
    descriptions = tuple(_describe(control.labels_attrs[label].attr, label) for label in labels)
    return ClassificationConfig(
        from_name=control.name,
        to_name=text_object.name,
        data_key=value if templated else value[1:],
        labels=labels,
        label_descriptions=descriptions,
        multi_label=attributes.get("choice") == MULTIPLE_CHOICE,
        object_tag=text_object.tag,
        templated=templated,
    )


def _attributes(tag) -> dict[str, str]:
    """A tag's attributes by lower-case name, as text (the editor reads them in lower case)."""
    return {key.lower(): str(value) for key, value in tag.attr.items()}


def _describe(attrs: dict, label: str) -> str:
    """What zero-shot embeds for a choice: its hint, else its value (the words annotators read; an alias, which
    Label Studio stores in results and so is the label, is often a short code)."""
    return attrs.get("hint") or attrs.get("value") or label
