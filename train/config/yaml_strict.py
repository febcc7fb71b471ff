"""The YAML every config goes through (a --config file, a run's config.yaml, a --section.key=value): safe
YAML (plain values only), with two refusals. A key given twice in one mapping is an error, not silently
the last value. Aliases (`*name`) are refused: a config has no use for them, and nested ones expand
exponentially ("billion laughs"), so a few hundred bytes would take the parser's time and memory."""

from __future__ import annotations

from typing import Any

import yaml


class StrictLoader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor}: aliases are not allowed in a config", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                continue  # unhashable: SafeLoader's own check names it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def load(text: str) -> Any:
    """`text` as YAML; yaml.YAMLError (with `problem` and `problem_mark`) for what is refused: that also
    covers nesting deeper than Python's recursion limit and an integer of more digits than Python converts."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except RecursionError as error:
        raise yaml.YAMLError("nested too deeply (a config is a few levels deep)") from error
    except ValueError as error:  # int("9" * 5000): past sys.get_int_max_str_digits()
        raise yaml.YAMLError(f"a value Python cannot read ({str(error).split(';')[0]})") from error
